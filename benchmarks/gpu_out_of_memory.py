"""On a GPU: a prompt whose prefill does not fit beside the KV pool gets a clear error, and the engine serves on.

The KV pool is sized to leave only HEADROOM bytes of the GPU for activations;
then a prompt of PROMPT_TOKENS tokens is sent (its prefill needs about a
gigabyte there), then a short one. Run from the repository root:

    python -m benchmarks.gpu_out_of_memory [stage04_batching,stage05_chunked,...]
"""

import importlib
import sys

import torch

from benchmarks.checkpoints import random_checkpoint

HEADROOM = 300 * 2**20
PROMPT_TOKENS = 30_000
STAGES = ["stage04_batching", "stage05_chunked", "stage10_overlap"]


def check(stage: str, model_path: str) -> bool:
    engine_class = importlib.import_module(stage).Engine
    options = {"max_prefill_tokens": 32768}
    if stage >= "stage05":
        options["chunked_prefill_size"] = -1  # the whole prompt in one step: the case that must not crash
    if stage >= "stage09":
        options["disable_cuda_graph"] = True  # graphs would take the headroom at start-up
    with engine_class(model_path=model_path, device="cuda", kv_cache_bytes=2**30, **options) as probe:
        torch.cuda.empty_cache()
        free_beside_weights = torch.cuda.mem_get_info()[0] + probe.runner.pool.nbytes
    with engine_class(model_path=model_path, device="cuda", kv_cache_bytes=free_beside_weights - HEADROOM, **options) as engine:
        short = [11, 22, 33, 44]
        expected = engine.generate(short, max_tokens=8, temperature=0, ignore_eos=True).token_ids
        try:
            engine.generate([(i * 31) % 30000 + 5 for i in range(PROMPT_TOKENS)], max_tokens=4, temperature=0)
            print(f"info {stage}: the {PROMPT_TOKENS}-token prefill fitted in {HEADROOM >> 20} MiB; nothing to check")
            return True
        except ValueError as error:
            print(f"ok   {stage}: refused with: {str(error)[:160]}...")
        again = engine.generate(short, max_tokens=8, temperature=0, ignore_eos=True).token_ids
        ok = again == expected
        print(f"{'ok  ' if ok else 'FAIL'} {stage}: serves on afterwards ({'same' if ok else 'different'} tokens for a short prompt)")
        return ok


def main() -> None:
    stages = sys.argv[1].split(",") if len(sys.argv) > 1 else STAGES
    model_path = str(random_checkpoint("qwen3-0.6b", device="cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {HEADROOM >> 20} MiB beside the KV pool, "
          f"a {PROMPT_TOKENS}-token prompt prefilled in one step")
    failures = sum(not check(stage, model_path) for stage in stages)
    print(f"failures: {failures}")


if __name__ == "__main__":
    main()
