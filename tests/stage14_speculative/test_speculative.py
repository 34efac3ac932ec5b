"""Stage 14: speculative decoding gives stage 13's output in fewer target forwards.

The oracles: stage 13's engine token for token (greedy, every model kind,
alone and in batches, with stop strings, grammars and tensor parallelism);
for sampling, the target model's exact next-token distributions computed
with transformers on a tiny vocabulary (a chi-square test that fails when
rejection sampling is replaced by accepting the target's favourite); and the
storm of the ladder's tests with speculation on: nothing lost, no page leaked.
"""

import json
import re

import jsonschema
import pytest
import torch

from checkpoints import KINDS, write_checkpoint, write_near_copy
from stage13_structured import Engine as Stage13Engine
from stage14_speculative import Engine, SamplingParams
from stage14_speculative.__main__ import build_parser
from stage14_speculative.cuda_graph_runner import CudaGraphRunner
from test_request_storm import PAGE, POOL_PAGES, STEPS, VOCAB, alone, drive_storm, storm_checkpoint  # noqa: F401

# Text that repeats itself, so n-gram guesses are often right (token ids of the built-in tokenizer's range).
REPEATING = [[17, 230, 4012, 88, 17, 230, 4012, 88, 17, 230], [5, 6, 7, 8, 9, 5, 6, 7], [901, 12, 901, 12, 901]]
GREEDY = dict(max_tokens=24, temperature=0, ignore_eos=True)


def outputs(engine, prompts, **kwargs):
    return engine.generate_batch(prompts, **kwargs)


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory, builtin_folder):
    """Another random dense model with the same vocabulary: its guesses are mostly wrong."""
    return write_checkpoint("dense", tmp_path_factory.mktemp("draft") / "dense", builtin_folder, seed=7)


@pytest.fixture(scope="module")
def near_draft(tmp_path_factory, checkpoints):
    return write_near_copy(checkpoints["dense"], tmp_path_factory.mktemp("near") / "dense", noise=0.08)


@pytest.mark.parametrize("kind", KINDS)
def test_ngram_greedy_tokens_equal_stage13_alone_and_in_a_batch(kind, checkpoints):
    with Stage13Engine(model_path=str(checkpoints[kind]), device="cpu") as before:
        expected = outputs(before, REPEATING, **GREEDY)
    with Engine(model_path=str(checkpoints[kind]), device="cpu", speculative_algorithm="NGRAM") as engine:
        batch = outputs(engine, REPEATING, **GREEDY)
        single = engine.generate(REPEATING[0], **GREEDY)
    assert [o.token_ids for o in batch] == [o.token_ids for o in expected]
    assert single.token_ids == expected[0].token_ids
    assert sum(o.spec_verify_ct for o in batch) > 0, "no draft was verified"
    # Each verify gave at least one token; fewer forwards than tokens when a guess was kept.
    for out in batch:
        assert out.spec_verify_ct == 0 or 1 <= out.spec_accept_length <= 4


@pytest.mark.parametrize("draft", ["itself", "another model"])
def test_standalone_draft_greedy_equals_stage13_and_gives_its_pages_back(draft, checkpoints, draft_folder):
    target = str(checkpoints["dense"])
    with Stage13Engine(model_path=target, device="cpu") as before:
        expected = outputs(before, REPEATING, **GREEDY)
    draft_path = target if draft == "itself" else str(draft_folder)
    with Engine(model_path=target, device="cpu", speculative_algorithm="STANDALONE",
                speculative_draft_model_path=draft_path, speculative_num_steps=3) as engine:
        got = outputs(engine, REPEATING, **GREEDY)
        worker = engine.speculator.drafter
        assert not worker.sequences and worker.runner.allocator.num_free == worker.runner.allocator.num_pages
        assert len(worker.runner.page_tables.free_rows) == worker.runner.page_tables.table.shape[0]
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    accept = sum(o.completion_tokens for o in got) / sum(o.spec_verify_ct for o in got)
    if draft == "itself":  # every guess is right: each verify gives the newest token's successor and 3 guesses
        assert accept > 3.5
    else:
        assert accept < 2


def test_verify_steps_through_uncaptured_graphs_equal_stage13(checkpoints):
    """Drafts padded to one width replay the verify graph of their batch bucket (the CPU runs its
    forward directly): padding rows, padding guesses and junk in the buffers change nothing."""
    prompts = REPEATING + [[40, 41, 40, 41, 40]]
    batches = [(prompts, 20), (prompts[:3], 19), (prompts[2:3], 17)]  # 4, 3 (a padding row) and 1 sequences
    with Stage13Engine(model_path=str(checkpoints["dense"]), device="cpu") as before:
        expected = [outputs(before, batch, **{**GREEDY, "max_tokens": n}) for batch, n in batches]
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", speculative_algorithm="NGRAM",
                attention_backend="runs") as engine:  # decode steps and verifies over runs, as on CUDA
        runner = engine.runner
        runner.graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages, 4,
                                        runner.config.max_position_embeddings, capture=False)
        runner.graphs.verify_inputs.fill_(5)  # junk: run() must overwrite what it uses
        used, run = [], runner.graphs.run
        runner.graphs.run = lambda batch, bucket: used.append((bucket, batch.sizes.num_seqs)) or run(batch, bucket)
        got = [outputs(engine, batch, **{**GREEDY, "max_tokens": n}) for batch, n in batches]
        width = engine.speculator.num_guesses + 1
    assert [[o.token_ids for o in out] for out in got] == [[o.token_ids for o in out] for out in expected]
    verified = [(bucket, n) for bucket, n in used if bucket.width > 1]
    assert verified and {bucket.width for bucket, _ in verified} == {width}
    assert any(n < bucket.batch_size for bucket, n in verified), "a verify graph ran with padding rows"
    assert any(bucket[0] == 1 for bucket, _ in verified), "a one-sequence verify graph ran (SDPA with a causal mask)"
    assert any(bucket.batch_size > 1 and bucket.runs_per_seq == 1 for bucket, _ in verified), \
        "a verify graph read its runs in place"


def test_verifies_wider_than_a_page_run_eagerly_with_stage13_tokens(checkpoints):
    """A verify graph's padding rows write their ``width`` tokens on the padding page, the pool's
    last: with pages narrower than a verify (page size 2) they would run past the pool, so such
    verifies run eagerly (``CudaGraphRunner.bucket``) while decode steps still replay graphs."""
    prompts = REPEATING + [[40, 41, 40, 41, 40]]
    batches = [(prompts, 20), (prompts[:3], 19)]  # 4 sequences, then 3 (a graph would pad a row)
    with Stage13Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=2) as before:
        expected = [outputs(before, batch, **{**GREEDY, "max_tokens": n}) for batch, n in batches]
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", speculative_algorithm="NGRAM", page_size=2,
                attention_backend="runs") as engine:
        runner = engine.runner
        runner.graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages, 4,
                                        runner.config.max_position_embeddings, capture=False)
        used, run = [], runner.graphs.run
        runner.graphs.run = lambda batch, bucket: used.append(bucket) or run(batch, bucket)
        got = [outputs(engine, batch, **{**GREEDY, "max_tokens": n}) for batch, n in batches]
        assert engine.speculator.num_guesses + 1 > 2 and engine.speculator.spec_verify_ct > 0
    assert [[o.token_ids for o in out] for out in got] == [[o.token_ids for o in out] for out in expected]
    assert used and all(bucket.width == 1 for bucket in used), "only decode steps replay graphs"


def test_a_draft_tree_gives_stage13_tokens_in_fewer_verifies_than_a_chain(checkpoints, near_draft):
    """A near copy of the target guesses; with ``eagle_topk=3`` each depth also offers its next two
    best tokens. Where the chain's guess is wrong and an alternative right, the tree keeps it (its
    attention saw only its ancestors, at its depth's position) and the token after it."""
    target = str(checkpoints["dense"])
    with Stage13Engine(model_path=target, device="cpu") as before:
        expected = outputs(before, REPEATING, **GREEDY)
    verifies, pages_back = {}, {}
    for topk in (1, 3):
        with Engine(model_path=target, device="cpu", speculative_algorithm="STANDALONE",
                    speculative_draft_model_path=str(near_draft), speculative_num_steps=3, speculative_eagle_topk=topk) as engine:
            got = outputs(engine, REPEATING, **GREEDY)
            verifies[topk] = sum(o.spec_verify_ct for o in got)
            runner = engine.runner
            pages_back[topk] = runner.allocator.num_free + runner.evictable_pages() == runner.allocator.num_pages
        assert [o.token_ids for o in got] == [o.token_ids for o in expected], topk
    assert verifies[3] < verifies[1], verifies
    assert all(pages_back.values())


def test_stop_strings_and_max_tokens_are_never_overshot(builtin_folder):
    prompt = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
    with Stage13Engine(device="cpu") as before:
        free = before.generate(prompt, max_tokens=48, temperature=0)
        stop = free.text[20:26]  # a stop string in the middle of what guesses will cover
        cases = [dict(stop=[stop])] + [dict(max_tokens=n) for n in (1, 2, 3, 5)]
        expected = [before.generate(prompt, **{**dict(max_tokens=48, temperature=0), **c}) for c in cases]
    with Engine(device="cpu", speculative_algorithm="NGRAM", speculative_num_draft_tokens=6) as engine:
        got = [engine.generate(prompt, **{**dict(max_tokens=48, temperature=0), **c}) for c in cases]
        assert engine.speculator.spec_verify_ct > 0
        assert engine.runner.allocator.num_free + engine.runner.evictable_pages() == engine.runner.allocator.num_pages
    for g, e, case in zip(got, expected, cases):
        assert (g.text, g.token_ids, g.finish_reason) == (e.text, e.token_ids, e.finish_reason), case
        assert g.completion_tokens <= case.get("max_tokens", 48)


def test_an_abort_between_verifies_frees_the_target_and_draft_pages(checkpoints):
    target = str(checkpoints["dense"])
    with Engine(model_path=target, device="cpu", speculative_algorithm="STANDALONE",
                speculative_draft_model_path=target, disable_radix_cache=True) as engine:
        rid = engine.add_request(REPEATING[0], max_tokens=200, temperature=0, ignore_eos=True)
        other = engine.add_request(REPEATING[1], max_tokens=12, temperature=0, ignore_eos=True)
        while engine.speculator.spec_verify_ct < 4:
            engine.step()
        assert engine.speculator.drafter.sequences and engine.runner.allocator.num_free < engine.runner.allocator.num_pages
        engine.abort_request(rid)
        while engine.get_output(other) is None:
            engine.step()
        assert engine.get_output(rid).finish_reason == "abort"
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages
        assert not engine.speculator.drafter.sequences
        assert engine.speculator.drafter.runner.allocator.num_free == engine.speculator.drafter.runner.allocator.num_pages


def test_constrained_requests_check_guesses_against_their_grammar(builtin_folder):
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"enum": ["apple", "pear"]},
                                                         "minItems": 6, "maxItems": 6}},
              "required": ["items"], "additionalProperties": False}
    requests = [("List six fruits as JSON:", SamplingParams(json_schema=schema, max_tokens=60, temperature=0)),
                ("Count: 1, 2, 3, 1, 2, 3,", SamplingParams(regex=r"( [123],){6}", max_tokens=30, temperature=0)),
                ("Once upon a time", SamplingParams(max_tokens=30, temperature=0))]
    prompts, params = [p for p, _ in requests], [s for _, s in requests]
    with Stage13Engine(device="cpu") as before:
        expected = before.generate_batch(prompts, params)
    with Engine(device="cpu", speculative_algorithm="NGRAM") as engine:
        got = engine.generate_batch(prompts, params)
    jsonschema.validate(json.loads(got[0].text), schema)
    assert re.fullmatch(r"( [123],){6}", got[1].text), got[1].text
    assert [g.text for g in got] == [e.text for e in expected]
    assert got[0].spec_verify_ct > 0 and got[0].spec_accept_length > 1, "repeated items should be guessed"


def test_requests_with_penalties_or_logprobs_decode_one_token_at_a_time(checkpoints):
    kinds = [dict(repetition_penalty=1.3), dict(return_logprob=True, top_logprobs_num=2)]
    with Stage13Engine(model_path=str(checkpoints["dense"]), device="cpu") as before:
        expected = [before.generate(REPEATING[0], **GREEDY, **k) for k in kinds]
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", speculative_algorithm="NGRAM") as engine:
        got = [engine.generate(REPEATING[0], **GREEDY, **k) for k in kinds]
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert all(g.spec_verify_ct == 0 for g in got)
    assert got[1].output_token_logprobs == pytest.approx(expected[1].output_token_logprobs, abs=1e-4)


@pytest.mark.distributed
def test_tensor_parallel_verify_equals_stage13(checkpoints):
    with Stage13Engine(model_path=str(checkpoints["dense"]), device="cpu") as before:
        expected = outputs(before, REPEATING, **GREEDY)
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", tp_size=2, speculative_algorithm="NGRAM") as engine:
        got = outputs(engine, REPEATING, **GREEDY)
        assert engine.speculator.spec_verify_ct > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


# ----- settings -----------------------------------------------------------------------------------

BAD = {
    "an unknown algorithm": dict(speculative_algorithm="MEDUSA"),
    "EAGLE without a head": dict(speculative_algorithm="EAGLE"),
    "STANDALONE without a draft": dict(speculative_algorithm="STANDALONE"),
    "a draft path without STANDALONE": dict(speculative_algorithm="NGRAM", speculative_draft_model_path="x"),
    "settings without an algorithm": dict(speculative_num_steps=3),
    "a tree of n-grams": dict(speculative_algorithm="NGRAM", speculative_eagle_topk=4),
    "a tree whose token count is not 1 + steps x topk": dict(
        speculative_algorithm="STANDALONE", speculative_draft_model_path="x", speculative_eagle_topk=2,
        speculative_num_draft_tokens=4),
    "steps and tokens that disagree": dict(speculative_algorithm="NGRAM", speculative_num_steps=3,
                                           speculative_num_draft_tokens=5),
    "no guess": dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=1),
    "zero steps": dict(speculative_algorithm="NGRAM", speculative_num_steps=0),
    "a topk that is not a number": dict(speculative_algorithm="STANDALONE", speculative_draft_model_path="x",
                                        speculative_eagle_topk="2"),
    "a tree across ranks": dict(speculative_algorithm="STANDALONE", speculative_draft_model_path="x",
                                speculative_eagle_topk=2, tp_size=2),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_speculative_settings_are_refused_naming_them(case):
    with pytest.raises(ValueError, match="speculative"):
        Engine(device="cpu", **BAD[case])


def test_a_draft_model_of_another_vocabulary_is_refused(checkpoints, storm_checkpoint):  # noqa: F811
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model_path=str(checkpoints["dense"]), device="cpu", speculative_algorithm="STANDALONE",
               speculative_draft_model_path=str(storm_checkpoint))


def test_command_line_flags_are_sglangs():
    args = build_parser().parse_args(["p", "--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", "d",
                                      "--speculative-num-steps", "3", "--speculative-num-draft-tokens", "4",
                                      "--speculative-eagle-topk", "1"])
    assert (args.speculative_algorithm, args.speculative_draft_model_path, args.speculative_num_steps,
            args.speculative_num_draft_tokens, args.speculative_eagle_topk) == ("STANDALONE", "d", 3, 4, 1)


def test_a_verify_graph_over_runs_writes_each_row_at_its_runs_end_and_padding_on_the_padding_page():
    """Each sequence's ``width`` new tokens are its run's last slots; padding rows write only the
    padding page (their run is ``width`` slots there), however junk the buffers were."""
    from types import SimpleNamespace

    from stage14_speculative.page_runs import VerifyRunsGraphAttention

    pool = SimpleNamespace(k=torch.zeros(1, 64, 1, 2), v=torch.zeros(1, 64, 1, 2), page_size=8)
    attention = VerifyRunsGraphAttention(pool, bs=4, width=3, max_context=64, padding_slot=40)
    attention.run_starts.fill_(5)
    attention.run_lens.fill_(5)
    batch = SimpleNamespace(sizes=SimpleNamespace(num_seqs=2), run_starts=torch.tensor([0, 16]), run_lens=torch.tensor([10, 5]))
    attention.fill_inputs(batch)
    attention.begin_step()
    assert attention.slots.tolist() == [7, 8, 9, 18, 19, 20, 40, 41, 42, 40, 41, 42]


def test_a_verify_split_into_prefix_and_new_tokens_equals_one_causal_call():
    """``VerifyRunAttention`` attends the cached prefix (a KV head's (head, token) pairs as its rows)
    and the new tokens (causally) apart and merges them by log-sum-exp: the same output as one causal
    call over each whole run (``ExtendRunAttention``, the eager verify's), for every query head."""
    from stage14_speculative.page_runs import ExtendRunAttention, VerifyRunAttention

    torch.manual_seed(0)
    width, kv_heads, groups, dim = 3, 2, 4, 8
    k_pool, v_pool = torch.randn(2, 64, kv_heads, dim)
    run_starts, run_lens = torch.tensor([0, 20, 41]), torch.tensor([9, 4, 23])  # prefixes of 6, 1 and 20 keys
    q = torch.randn(len(run_starts) * width, kv_heads * groups, dim)
    expected = ExtendRunAttention(torch.full((3,), width), run_starts, run_lens, width, 64)(q, k_pool, v_pool)
    got = VerifyRunAttention(run_starts, run_lens, width, 64)(q, k_pool, v_pool)
    torch.testing.assert_close(got, expected)
