"""From stage 12 on: the ``runs`` attention backend (decode and prompt chunks read the pool in place,
run by run; the default on CUDA) gives the tokens of the ``gather`` backend (the default on the CPU), in every stage
that has it, with prefixes served from the cache and prompts fed in chunks."""

import importlib

import pytest

from conftest import STAGES, stage_has
from test_packed_attention import run_rounds

RUNS = [s for s in STAGES if stage_has(s, "attention_backend", "runs")]


@pytest.mark.parametrize("stage", RUNS)
def test_runs_give_the_gather_tokens(stage, checkpoints, monkeypatch):
    monkeypatch.setattr(importlib.import_module(f"{stage}.page_runs"), "MIN_TOKENS_PER_RUN", 0)  # short runs too
    engine_class = importlib.import_module(stage).Engine
    kwargs = dict(model_path=str(checkpoints["dense"]), device="cpu", page_size=4, chunked_prefill_size=16)
    with engine_class(attention_backend="gather", **kwargs) as engine:
        expected = run_rounds(engine)
    with engine_class(attention_backend="runs", **kwargs) as engine:
        decodes, extends, forward = [], [], engine.runner.forward

        def logging_forward(batch, *args):
            sizes = batch.sizes
            (decodes if sizes.max_new_length == 1 else extends).append((sizes.runs_per_seq, sizes.max_run_len,
                                                                        sizes.max_new_length))
            return forward(batch, *args)

        engine.runner.forward = logging_forward
        assert run_rounds(engine) == expected
    assert max(runs for runs, _, _ in decodes) >= 2  # decode steps read runs in place (a cached prefix and its own pages)
    assert any(runs and longest > new for runs, longest, new in extends)  # so do later chunks, with their prefix
