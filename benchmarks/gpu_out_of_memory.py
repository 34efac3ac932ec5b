"""On a GPU: work that does not fit beside the KV pool gets a clear error, and the engine serves on.

* a long prefill: the KV pool is sized to leave only HEADROOM bytes of the
  GPU for activations; then a prompt of PROMPT_TOKENS tokens is sent (its
  prefill needs about a gigabyte there), then a short one;
* CUDA graphs at start-up (stages 09+): a pool that leaves HEADROOM beside it
  is too big for the graphs, and the engine must say so instead of failing
  inside torch or cuBLAS;
* a CUDA graph recorded mid-serve (a decode step whose key bucket is new)
  with only GRAPH_FREE bytes of the GPU left: the request stops with the
  error; once memory is back, the same prompts give a fresh engine's tokens.

Run from the repository root:

    python -m benchmarks.gpu_out_of_memory [stage04_batching,stage05_chunked,...]
"""

import importlib
import sys

import torch

from benchmarks.checkpoints import random_checkpoint

HEADROOM = 300 * 2**20
PROMPT_TOKENS = 30_000
STAGES = ["stage04_batching", "stage05_chunked", "stage10_overlap"]
GRAPH_STAGES = ["stage09_cuda_graph", "stage10_overlap"]
GRAPH_FREE = 4 * 2**20
SHORT = [11, 22, 33, 44]
LONG = [(i * 31) % 30000 + 5 for i in range(1500)]  # one prefill step; decodes past the key buckets of start-up
GREEDY = dict(max_tokens=6, temperature=0, ignore_eos=True)


def check(stage: str, model_path: str) -> bool:
    engine_class = importlib.import_module(stage).Engine
    options = {"max_prefill_tokens": 32768}
    if stage >= "stage05":
        options["chunked_prefill_size"] = -1  # the whole prompt in one step: the case that must not crash
    if stage >= "stage09":
        options["disable_cuda_graph"] = True  # graphs would take the headroom at start-up
    pool = free_beside_weights(engine_class, model_path, **options) - HEADROOM
    with engine_class(model_path=model_path, device="cuda", kv_cache_bytes=pool, **options) as engine:
        expected = engine.generate(SHORT, max_tokens=8, temperature=0, ignore_eos=True).token_ids
        try:
            engine.generate([(i * 31) % 30000 + 5 for i in range(PROMPT_TOKENS)], max_tokens=4, temperature=0)
            print(f"info {stage}: the {PROMPT_TOKENS}-token prefill fitted in {HEADROOM >> 20} MiB; nothing to check")
            return True
        except ValueError as error:
            print(f"ok   {stage}: refused with: {str(error)[:160]}...")
        again = engine.generate(SHORT, max_tokens=8, temperature=0, ignore_eos=True).token_ids
        ok = again == expected
        print(f"{'ok  ' if ok else 'FAIL'} {stage}: serves on afterwards ({'same' if ok else 'different'} tokens for a short prompt)")
        return ok


def free_beside_weights(engine_class, model_path: str, **options) -> int:
    """Bytes a KV pool could take: what is free with the model loaded, plus a probe pool's own."""
    with engine_class(model_path=model_path, device="cuda", kv_cache_bytes=2**30, **options) as probe:
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0] + probe.runner.pool.nbytes


def check_graphs_at_start_up(stage: str, model_path: str) -> bool:
    engine_class = importlib.import_module(stage).Engine
    pool = free_beside_weights(engine_class, model_path, disable_cuda_graph=True) - HEADROOM
    try:
        with engine_class(model_path=model_path, device="cuda", kv_cache_bytes=pool):
            print(f"info {stage}: the graphs fitted in {HEADROOM >> 20} MiB; nothing to check")
            return True
    except ValueError as error:
        ok = "recording the decode CUDA graphs ran out of device memory" in str(error)
        print(f"{'ok  ' if ok else 'FAIL'} {stage}: start-up refused with: {str(error)[:200]}...")
    torch.cuda.empty_cache()
    with engine_class(model_path=model_path, device="cuda", kv_cache_bytes=2**30) as engine:  # the GPU still works
        engine.generate(SHORT, **GREEDY)
    return ok


def fill_device(leave: int) -> list[torch.Tensor]:
    """Take the GPU's free memory, down to about ``leave`` bytes."""
    blocks = []
    for size in (2**30, 64 * 2**20, 2 * 2**20):
        while torch.cuda.mem_get_info()[0] - max(size, 20 * 2**20) > leave:  # small blocks come in 20 MiB segments
            blocks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
    return blocks


def check_graph_mid_serve(stage: str, model_path: str) -> bool:
    engine_class = importlib.import_module(stage).Engine
    options = dict(model_path=model_path, device="cuda", kv_cache_bytes=8 * 2**30)
    with engine_class(**options) as fresh:
        expected = [fresh.generate(p, **GREEDY).token_ids for p in (SHORT, LONG)]
    torch.cuda.empty_cache()
    with engine_class(**options) as engine:
        rid = engine.add_request(LONG, **GREEDY)
        engine.step()  # the prefill: the next step decodes with a key bucket no graph has yet
        torch.cuda.empty_cache()
        filler = fill_device(GRAPH_FREE)
        output = None
        while output is None:
            engine.step()
            output = engine.get_output(rid)
        del filler
        torch.cuda.empty_cache()
        stopped = output.finish_reason == "abort" and "ran out of device memory" in (output.error or "")
        print(f"{'ok  ' if stopped else 'info'} {stage}: a graph recorded mid-serve with {GRAPH_FREE >> 20} MiB free: "
              f"{'stopped with: ' + output.error[:120] if stopped else 'it fitted (' + output.finish_reason + ')'}")
        again = [engine.generate(p, **GREEDY).token_ids for p in (SHORT, LONG)]
        ok = again == expected
        print(f"{'ok  ' if ok else 'FAIL'} {stage}: serves on afterwards ({'same' if ok else 'different'} tokens as a fresh engine)")
        return ok


def main() -> None:
    stages = sys.argv[1].split(",") if len(sys.argv) > 1 else STAGES
    model_path = str(random_checkpoint("qwen3-0.6b", device="cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {HEADROOM >> 20} MiB beside the KV pool, "
          f"a {PROMPT_TOKENS}-token prompt prefilled in one step")
    failures = sum(not check(stage, model_path) for stage in stages)
    for stage in (s for s in GRAPH_STAGES if s in stages or len(sys.argv) == 1):
        failures += not check_graphs_at_start_up(stage, model_path)
        failures += not check_graph_mid_serve(stage, model_path)
    print(f"failures: {failures}")


if __name__ == "__main__":
    main()
