"""Stage 14: speculative sampling keeps the target's distribution, and a storm loses and leaks nothing.

The sampling oracle is the target model's exact distribution of the first two
sampled tokens, computed with transformers on a tiny vocabulary: a chi-square
test that also fails when rejection sampling is replaced by greedy
acceptance. The storm is the ladder's (tests/ladder/test_request_storm.py)
with speculation on.
"""

import math
from collections import Counter

import pytest
import torch

from checkpoints import write_checkpoint, write_near_copy
from reference import load_hf
from stage14_speculative import Engine, spec_verify
from test_request_storm import PAGE, POOL_PAGES, STEPS, alone, drive_storm, storm_checkpoint  # noqa: F401

# ----- sampling: the same distribution ------------------------------------------------------------

TINY_VOCAB = 8
CYCLE = [0, 1, 2, 3, 4, 5, 6, 7] * 2 + [0, 1]  # every token occurs, so every first token has an n-gram guess
SAMPLES = 3000  # a draft tree's subtler mistakes need the power
NGRAM_SAMPLES = 1200  # greedy acceptance scores ~2x the critical value at this size, a right sampler ~half of it


def chi_square_rejects(counts: Counter, probs: dict, n: int) -> bool:
    """Pearson's test at p = 0.001: cells with an expected count under 5 are pooled into one."""
    big = {cell: p * n for cell, p in probs.items() if p * n >= 5}
    observed = [counts[c] for c in big] + [n - sum(counts[c] for c in big)]
    expected = list(big.values()) + [n - sum(big.values())]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    df = len(big)
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty
    return stat > critical


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, builtin_folder):
    """A tiny-vocabulary model, and transformers' exact distribution of its first two sampled tokens."""
    folder = write_checkpoint("dense", tmp_path_factory.mktemp("tiny") / "dense", builtin_folder, vocab_size=TINY_VOCAB)
    model = load_hf(folder)
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([CYCLE])).logits[0, -1], dim=-1)
        second = torch.softmax(model(torch.tensor([CYCLE + [t] for t in range(TINY_VOCAB)])).logits[:, -1], dim=-1)
    joint = {(a, b): (first[a] * second[a, b]).item() for a in range(TINY_VOCAB) for b in range(TINY_VOCAB)}
    return folder, joint


def sample_pairs(folder, seed: int, samples: int, **speculative) -> tuple[Counter, int]:
    speculative = speculative or dict(speculative_algorithm="NGRAM")
    with Engine(model_path=str(folder), device="cpu", seed=seed, **speculative) as engine:
        # Three tokens, so the second one may come from a guess (a draft leaves room for the target's own token).
        outs = engine.generate_batch([CYCLE] * samples, max_tokens=3, temperature=1.0, ignore_eos=True)
        return Counter(tuple(o.token_ids[:2]) for o in outs), sum(o.spec_verify_ct > 0 for o in outs)


def test_rejection_sampling_keeps_the_target_distribution(tiny, monkeypatch):
    folder, joint = tiny
    counts, verified = sample_pairs(folder, 0, NGRAM_SAMPLES)
    assert verified == NGRAM_SAMPLES, "every second token should come from a verified guess"
    assert not chi_square_rejects(counts, joint, NGRAM_SAMPLES)

    # Greedy acceptance (keep a guess when it is the target's favourite, else reject it) is caught by the same test.
    monkeypatch.setattr(spec_verify, "kept_by_chance", lambda probs, guess, chance: probs.argmax(dim=-1) == guess)
    wrong, _ = sample_pairs(folder, 0, NGRAM_SAMPLES)
    assert chi_square_rejects(wrong, joint, NGRAM_SAMPLES)


def test_a_draft_tree_keeps_the_target_distribution(tiny, tmp_path):
    """A draft tree offers three candidates for the second token (a near copy of the model guesses
    one, its next two best are alternatives): each is tried against what the ones before it left of
    the target's distribution, and the tokens still follow transformers' exact distribution."""
    folder, joint = tiny
    draft = write_near_copy(folder, tmp_path / "near", noise=0.3)
    counts, verified = sample_pairs(folder, 0, SAMPLES, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(draft),
                                    speculative_eagle_topk=3)
    assert verified == SAMPLES
    assert not chi_square_rejects(counts, joint, SAMPLES)


# ----- nothing lost, nothing leaked -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["NGRAM", "STANDALONE", "STANDALONE tree"])
def test_a_storm_with_speculation_loses_and_leaks_nothing(algorithm, storm_checkpoint, alone, tmp_path):  # noqa: F811
    kwargs = dict(model_path=str(storm_checkpoint), device="cpu", page_size=PAGE, max_prefill_tokens=64,
                  chunked_prefill_size=16, schedule_policy="lpm", speculative_algorithm=algorithm.split()[0])
    if algorithm == "STANDALONE":
        kwargs["speculative_draft_model_path"] = str(storm_checkpoint)  # itself: long runs of kept guesses
    if algorithm == "STANDALONE tree":  # a near copy: alternatives kept, and the token after them fed again
        kwargs["speculative_draft_model_path"] = str(write_near_copy(storm_checkpoint, tmp_path / "near", noise=0.08))
        kwargs["speculative_eagle_topk"] = 3
    probe = Engine(**kwargs)
    page_bytes = probe.runner.pool.bytes_per_page(probe.config, PAGE, torch.float32)
    probe.shutdown()
    with Engine(kv_cache_bytes=POOL_PAGES * page_bytes, **kwargs) as engine:
        runner = engine.runner
        submitted, outputs_by_id, _ = drive_storm(engine)
        assert len(submitted) > STEPS and outputs_by_id.keys() == submitted.keys(), "a request was lost"
        assert engine.scheduler.num_retractions > 0 and engine.speculator.spec_verify_ct > 0
        for rid, (prompt, params) in submitted.items():
            out = outputs_by_id[rid]
            assert len(out.token_ids) <= params.max_tokens
            if params.temperature == 0:
                expected = alone(prompt, params)
                assert out.token_ids == (expected[: len(out.token_ids)] if out.finish_reason == "abort" else expected), rid
        radix = runner.radix_cache
        assert radix.locked_pages == 0
        assert runner.allocator.num_free + radix.total_pages == runner.allocator.num_pages, "a page was leaked"
        if algorithm != "NGRAM":
            assert not engine.speculator.drafter.sequences
            assert engine.speculator.drafter.runner.allocator.num_free == engine.speculator.drafter.runner.allocator.num_pages
