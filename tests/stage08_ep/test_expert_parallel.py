"""Stage 08: experts spread over ranks give the same tokens, with 1/N of the expert weights each.

Greedy tokens can be compared exactly: expert parallelism changes only the
order in which expert outputs are added (a sum over ranks), moving logits by
about 1e-6 in fp32, far below the 1e-3 gaps between best and second-best
tokens on these checkpoints.
"""

import pytest
import torch

from reference import RecordingSampler
from stage08_ep import Engine

pytestmark = pytest.mark.distributed
GREEDY = dict(max_tokens=10, temperature=0, ignore_eos=True)


def prompts():
    gen = torch.Generator().manual_seed(31)
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (6, 41, 17, 90)]


@pytest.fixture(scope="module")
def reference(engine_for):
    """kind -> stage07's tokens (tp=1), which ep must reproduce."""
    return {kind: [o.token_ids for o in engine_for("stage07_tp", kind).generate_batch(prompts(), **GREEDY)]
            for kind in ("moe", "dense", "qwen2_moe")}


@pytest.mark.parametrize("kind", ["moe", "qwen2_moe"])
@pytest.mark.parametrize("tp_size, ep_size", [(1, 2), (2, 2)])
def test_ep2_gives_the_same_tokens_with_experts_busy_on_both_ranks(tp_size, ep_size, kind, checkpoints, reference):
    with Engine(model_path=str(checkpoints[kind]), device="cpu", tp_size=tp_size, ep_size=ep_size) as engine:
        tokens = [o.token_ids for o in engine.generate_batch(prompts(), **GREEDY)]
        counts = engine.expert_token_counts()
    assert tokens == reference[kind]
    half = len(counts[0]) // 2
    for layer in counts:  # both ranks' experts really received tokens
        assert sum(layer[:half]) > 0 and sum(layer[half:]) > 0


def test_ep1_matches_stage07(checkpoints, reference):
    with Engine(model_path=str(checkpoints["moe"]), device="cpu") as engine:
        assert [o.token_ids for o in engine.generate_batch(prompts(), **GREEDY)] == reference["moe"]


@pytest.mark.parametrize("tp_size, ep_size", [(1, 2), (2, 2)])
def test_dense_checkpoints_still_work(tp_size, ep_size, checkpoints, reference):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", tp_size=tp_size, ep_size=ep_size) as engine:
        assert [o.token_ids for o in engine.generate_batch(prompts(), **GREEDY)] == reference["dense"]
        assert engine.expert_token_counts() == []


def test_each_rank_holds_half_the_expert_weights(checkpoints):
    def expert_bytes(engine):
        return sum(p.numel() * p.element_size() for n, p in engine.runner.model.named_parameters() if ".experts." in n)

    with Engine(model_path=str(checkpoints["moe"]), device="cpu") as whole:
        full = expert_bytes(whole)
    with Engine(model_path=str(checkpoints["moe"]), device="cpu", ep_size=2) as split:
        assert expert_bytes(split) * 2 == full
        assert list(split.runner.model.model.layers[1].mlp.local_experts) == [0, 1, 2, 3]


def test_experts_must_divide_by_ep_size(checkpoints):
    with pytest.raises(ValueError, match="ep_size=3 must divide the model's 8 experts"):
        Engine(model_path=str(checkpoints["moe"]), device="cpu", ep_size=3)


def test_unequal_tp_and_ep_sizes_are_refused(checkpoints):
    with pytest.raises(ValueError, match="use equal sizes"):
        Engine(model_path=str(checkpoints["moe"]), device="cpu", tp_size=2, ep_size=4)


def test_shared_expert_is_added_once_across_ep_ranks(checkpoints):
    """Qwen2-MoE's shared expert lives whole on both ranks; the logits show it counted once, not twice."""

    def logits(**kwargs):
        with Engine(model_path=str(checkpoints["qwen2_moe"]), device="cpu", **kwargs) as engine:
            engine.runner.sampler = recorder = RecordingSampler(engine.runner.sampler)
            engine.generate_batch(prompts(), **GREEDY)
        return recorder.seen

    for ours, theirs in zip(logits(ep_size=2), logits(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
