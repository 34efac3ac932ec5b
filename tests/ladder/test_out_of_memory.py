"""A step that runs out of device memory stops its requests with a clear error; the engine serves on.

A CPU has no device memory to run out of, so the model here raises
``torch.OutOfMemoryError`` (what CUDA raises) for any forward over more than
LIMIT tokens: a long prompt's prefill. Afterwards the engine must answer as
before, none of the failed step's K/V may have been cached (the same long
prompt, served later, gives the right tokens), and no page may be left behind.
"""

import inspect

import pytest
import torch

from conftest import STAGES, stage_engine_class

LIMIT = 40
SHORT = [7, 70, 700, 7000]
LONG = [(i * 37) % 5000 + 3 for i in range(60)]
GREEDY = dict(max_tokens=5, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("stage", STAGES)
def test_a_step_out_of_device_memory_stops_its_requests_and_the_engine_serves_on(stage, checkpoints, monkeypatch):
    engine_class = stage_engine_class(stage)
    kwargs = {"page_size": 4} if "page_size" in inspect.signature(engine_class).parameters else {}
    with engine_class(model_path=str(checkpoints["dense"]), device="cpu", **kwargs) as engine:
        short, long = engine.generate(SHORT, **GREEDY).token_ids, engine.generate(LONG, **GREEDY).token_ids
        flush = getattr(engine, "flush_cache", lambda: None)
        flush()  # so that the long prompt is computed again, not read from the prefix cache

        model, forward = engine.runner.model, engine.runner.model.forward

        def forward_with_little_memory(input_ids, *args, **kwargs):
            if input_ids.numel() > LIMIT:
                pool = getattr(engine.runner, "pool", None)
                if pool is not None:  # a forward that fails midway leaves half-written K/V behind
                    for cache in (pool.k, pool.v):
                        cache.normal_(0, 3)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            return forward(input_ids, *args, **kwargs)

        monkeypatch.setattr(model, "forward", forward_with_little_memory)
        with pytest.raises(ValueError, match=r"ran out of device memory; its requests were stopped and the engine serves on"):
            engine.generate(LONG, **GREEDY)
        assert engine.generate(SHORT, **GREEDY).token_ids == short

        monkeypatch.setattr(model, "forward", forward)
        assert engine.generate(LONG, **GREEDY).token_ids == long, "K/V of the failed step was reused"
        if hasattr(engine.runner, "allocator"):
            flush()
            assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages, "a page was leaked"
