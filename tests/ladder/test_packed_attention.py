"""The packed attention layout that CUDA runs (every sequence's keys gathered into one
buffer, one varlen call) gives the tokens of the CPU layout, on the CPU.

On the CPU, ``varlen_attention`` is a loop over the packed sequences; forcing
``GatherAttention.packed`` checks the gather indices and sequence offsets that
the GPU uses, with prefixes served from the cache and prompts fed in chunks.
"""

import importlib

import pytest

from conftest import STAGES, stage_has
from test_parity import mixed_prompts

PAGED = [s for s in STAGES if stage_has(s, "page_size")]
GREEDY = dict(max_tokens=10, temperature=0, ignore_eos=True)


def shared_prefix_prompts():
    """Second-round prompts that extend the first round's, so the prefix cache serves part of them."""
    first = mixed_prompts((40, 23, 70))
    return first, [p + q for p, q in zip(first, mixed_prompts((5, 19, 1)))]


def run_rounds(engine):
    first, second = shared_prefix_prompts()
    return [[o.token_ids for o in engine.generate_batch(prompts, **GREEDY)] for prompts in (first, second)]


@pytest.mark.parametrize("stage", PAGED)
def test_packed_layout_gives_the_cpu_layout_tokens(stage, checkpoints, monkeypatch):
    engine_class = importlib.import_module(stage).Engine
    kwargs = dict(model_path=str(checkpoints["dense"]), device="cpu", page_size=4)
    if stage_has(stage, "chunked_prefill_size"):
        kwargs["chunked_prefill_size"] = 16  # long prompts are fed in chunks over a cached prefix
    with engine_class(**kwargs) as engine:
        expected = run_rounds(engine)
    attention_class = importlib.import_module(f"{stage}.attention_backend").GatherAttention
    monkeypatch.setattr(attention_class, "packed", True)
    with engine_class(**kwargs) as engine:
        assert run_rounds(engine) == expected
        if stage_has(stage, "disable_radix_cache"):
            assert engine.generate(shared_prefix_prompts()[1][2], **GREEDY).cached_tokens > 0


@pytest.mark.parametrize("stage", PAGED)
def test_every_page_table_row_comes_back(stage, engine_for):
    engine = engine_for(stage, "dense")
    tables = engine.runner.page_tables
    rows = len(tables.free_rows)
    engine.generate_batch(mixed_prompts((4, 30, 11, 50, 7)), **GREEDY)
    assert len(tables.free_rows) == rows == tables.table.shape[0]
