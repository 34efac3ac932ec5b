"""A step that runs out of device memory stops its requests with a clear error; the engine serves on.

A CPU has no device memory to run out of, so the model here raises
``torch.OutOfMemoryError`` (what CUDA raises) for any forward over more than
LIMIT tokens: a long prompt's prefill. Afterwards the engine must answer as
before, none of the failed step's K/V may have been cached (the same long
prompt, served later, gives the right tokens), and no page may be left behind.
"""

import importlib

import pytest
import torch

from conftest import STAGES, stage_engine_class, stage_has

LIMIT = 40
PAGE = 4
SHORT = [7, 70, 700, 7000]
LONG = [(i * 37) % 5000 + 3 for i in range(60)]
GREEDY = dict(max_tokens=5, temperature=0, ignore_eos=True)


def little_memory(engine, forward):
    """``forward``, except that a step over more than LIMIT tokens writes garbage into the
    slots it was to fill (a forward that fails midway leaves half-written K/V) and raises
    ``OutOfMemoryError``, as CUDA does."""

    def forward_with_little_memory(input_ids, positions, attention):
        if input_ids.numel() > LIMIT:
            pool = getattr(engine.runner, "pool", None)
            if pool is not None:  # stage 01 keeps each request's cache apart: nothing shared to spoil
                for cache in (pool.k, pool.v):
                    cache[:, attention.slots] = torch.randn_like(cache[:, attention.slots]) * 3
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return forward(input_ids, positions, attention)

    return forward_with_little_memory


@pytest.mark.parametrize("stage", STAGES)
def test_a_step_out_of_device_memory_stops_its_requests_and_the_engine_serves_on(stage, checkpoints, monkeypatch):
    engine_class = stage_engine_class(stage)
    kwargs = {"page_size": PAGE} if stage_has(stage, "page_size") else {}
    with engine_class(model_path=str(checkpoints["dense"]), device="cpu", **kwargs) as engine:
        short, long = engine.generate(SHORT, **GREEDY).token_ids, engine.generate(LONG, **GREEDY).token_ids
        flush = getattr(engine, "flush_cache", lambda: None)
        flush()  # so that the long prompt is computed again, not read from the prefix cache

        model, forward = engine.runner.model, engine.runner.model.forward

        monkeypatch.setattr(model, "forward", little_memory(engine, forward))
        with pytest.raises(ValueError, match=r"ran out of device memory; its requests were stopped and the engine serves on"):
            engine.generate(LONG, **GREEDY)
        assert engine.generate(SHORT, **GREEDY).token_ids == short

        monkeypatch.setattr(model, "forward", forward)
        assert engine.generate(LONG, **GREEDY).token_ids == long, "K/V of the failed step was reused"
        if stage_has(stage, "page_size"):
            flush()
            assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages, "a page was leaked"


@pytest.mark.parametrize("stage", [s for s in STAGES if stage_has(s, "max_prefill_tokens")])  # continuous batching
def test_requests_decoding_beside_the_failed_prefill_are_stopped_and_nothing_wrong_is_cached(stage, checkpoints, monkeypatch):
    """Two requests decode; a long prompt joins their step and the step runs out of memory.

    All three stop with the error. With overlap (stage 10+), the decoders also have a
    step in flight: reading it must not cache pages the failed step was to write (it
    would, when the failed step's token completes a page). The failure comes after 3 ..
    3 + PAGE - 1 decode steps, so the failed step's token lands at each offset of a page,
    one engine serving through all of them.
    """
    engine_class = stage_engine_class(stage)
    with engine_class(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE) as engine:
        decoders = [[9, 99, 999, 9999, 5, 55, 555], [8, 88, 888, 8888, 4, 44, 444]]
        params = dict(GREEDY, max_tokens=12)
        expected = [engine.generate(p, **params).token_ids for p in decoders]
        # A prompt + its whole answer: served later, it would read any page the failed step spoiled.
        continuations = [p + e for p, e in zip(decoders, expected)]
        expected += [engine.generate(c, **GREEDY).token_ids for c in continuations]
        model, forward = engine.runner.model, engine.runner.model.forward
        for decode_steps in range(3, 3 + PAGE):
            engine.flush_cache()
            monkeypatch.setattr(model, "forward", little_memory(engine, forward))
            ids = [engine.add_request(p, **params) for p in decoders]
            for _ in range(decode_steps):  # both are decoding now
                engine.step()
            ids.append(engine.add_request(LONG, **GREEDY))
            outputs = {}
            for _ in range(50):
                engine.step()
                outputs.update({rid: out for rid in ids if rid not in outputs and (out := engine.get_output(rid))})
                if len(outputs) == len(ids):
                    break
            assert outputs[ids[2]].finish_reason == "abort", decode_steps
            assert "ran out of device memory" in outputs[ids[2]].error  # get_output's callers learn why too
            if stage_has(stage, "chunked_prefill_size"):  # chunked prefill puts the long prompt into the decoders' step
                assert [outputs[rid].finish_reason for rid in ids[:2]] == ["abort", "abort"], decode_steps
            monkeypatch.setattr(model, "forward", forward)
            again = [engine.generate(p, **params).token_ids for p in decoders]
            again += [engine.generate(c, **GREEDY).token_ids for c in continuations]
            assert again == expected, f"K/V of the failed step was reused (after {decode_steps} decode steps)"
            engine.flush_cache()
            assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages, f"a page was leaked ({decode_steps})"


GRAPH_STAGES = [s for s in STAGES if stage_has(s, "disable_cuda_graph")]
GRAPH_FAILURES = {  # what recording raised on an H100 with too little room beside the pool
    "torch": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 MiB"),
    "cublas": RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    "unrelated": RuntimeError("CUDA error: an illegal memory access was encountered"),
}


@pytest.mark.parametrize("failure", GRAPH_FAILURES)
@pytest.mark.parametrize("stage", GRAPH_STAGES)
def test_graphs_without_room_beside_the_pool_stop_start_up_saying_what_to_change(stage, failure, engine_for, monkeypatch):
    """A CPU cannot record graphs, so recording is replaced by one that fails as it did on the
    H100 (``benchmarks.gpu_out_of_memory`` checks the real thing). Other errors pass through."""
    module = importlib.import_module(f"{stage}.model_runner")
    runner = engine_for(stage, "dense").runner

    class FailingRecorder:
        def __init__(self, *args, **kwargs):
            pass

        def capture_all(self, progress):
            raise GRAPH_FAILURES[failure]

    monkeypatch.setattr(module, "CudaGraphRunner", FailingRecorder)
    monkeypatch.setattr(module, "varlen_attn", object())  # the flash kernel "exists"
    monkeypatch.setattr(runner, "use_cuda_graph", True)
    monkeypatch.setattr(runner, "dtype", torch.bfloat16)
    if failure == "unrelated":
        with pytest.raises(RuntimeError, match="illegal memory access"):
            runner.init_cuda_graphs(progress=False)
        return
    with pytest.raises(ValueError, match=r"recording the decode CUDA graphs ran out of device memory beside the KV pool "
                                         r"\(.* GiB\)\. Give them room: a smaller kv_cache_bytes, a smaller "
                                         r"cuda_graph_max_bs, or disable_cuda_graph"):
        runner.init_cuda_graphs(progress=False)
    assert runner.graphs is None
