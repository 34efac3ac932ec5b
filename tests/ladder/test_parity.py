"""Every stage produces transformers' greedy tokens, and the same tokens as the stage before.

Runs once per stage folder, so each stage keeps the promises of the ones before it.
"""

import pytest
import torch

from conftest import STAGES
from reference import hf_greedy, load_hf

KINDS = ["dense", "moe", "llama", "qwen2", "qwen2_moe", "mistral"]
MAX_NEW = 12


def mixed_prompts(lengths=(3, 17, 40, 9)):
    """Random token prompts of different lengths (seeded)."""
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_tokens(checkpoints):
    """kind -> greedy tokens of transformers' generate for each mixed prompt."""
    out = {}
    for kind in KINDS:
        model = load_hf(checkpoints[kind])
        out[kind] = [hf_greedy(model, p, MAX_NEW) for p in mixed_prompts()]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", STAGES)
def test_batch_greedy_equals_transformers(stage, kind, engine_for, hf_tokens):
    engine = engine_for(stage, kind)
    outputs = engine.generate_batch(mixed_prompts(), max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in outputs] == hf_tokens[kind]
    assert all(o.finish_reason == "length" and o.completion_tokens == MAX_NEW for o in outputs)


@pytest.mark.parametrize("stage", STAGES[1:])
def test_same_tokens_as_the_stage_before(stage, engine_for):
    before = STAGES[STAGES.index(stage) - 1]
    prompts = mixed_prompts((5, 31, 2, 64, 16))
    kwargs = dict(max_tokens=20, temperature=0, ignore_eos=True)
    ours = engine_for(stage, "dense").generate_batch(prompts, **kwargs)
    theirs = engine_for(before, "dense").generate_batch(prompts, **kwargs)
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]


@pytest.mark.parametrize("stage", STAGES)
def test_a_prompt_alone_and_in_a_batch_give_the_same_tokens(stage, engine_for):
    engine = engine_for(stage, "moe")
    prompts = mixed_prompts()
    batch = engine.generate_batch(prompts, max_tokens=8, temperature=0, ignore_eos=True)
    single = [engine.generate(p, max_tokens=8, temperature=0, ignore_eos=True) for p in prompts]
    assert [o.token_ids for o in batch] == [o.token_ids for o in single]
