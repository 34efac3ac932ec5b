"""On a GPU: the request storm of tests/ladder/test_request_storm.py, in bf16, with CUDA graphs.

The CPU test runs every stage eagerly in fp32. Here the same 223 requests,
random aborts and 24-page pool go through the GPU paths: bf16, the flash
kernel, graph replays with padding rows (stages 09+), the overlap schedule
(10+). What must hold is the same, but one check: in bf16, a batch rounds
differently from a request alone, so a greedy request may drift from its
alone run after a near tie; the share that match exactly is printed.

    python -m benchmarks.gpu_storm [stage06_scheduling,stage09_cuda_graph,...]
"""

import importlib
import sys
from pathlib import Path

import torch

from benchmarks.checkpoints import random_checkpoint

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / d) for d in ("", "ladder")]
from test_request_storm import PAGE, POOL_PAGES, drive_storm

STAGES = ["stage06_scheduling", "stage09_cuda_graph", "stage10_overlap"]


def run_storm(stage: str, model_path: str) -> tuple[bool, str]:
    engine_class = importlib.import_module(stage).Engine
    probe = engine_class(model_path=model_path, device="cuda", dtype="bfloat16", page_size=PAGE, kv_cache_bytes=2**24)
    page_bytes = probe.runner.pool.bytes_per_page(probe.config, PAGE, torch.bfloat16)
    probe.shutdown()
    with engine_class(model_path=model_path, device="cuda", dtype="bfloat16", page_size=PAGE, max_prefill_tokens=64,
                      chunked_prefill_size=16, schedule_policy="lpm", kv_cache_bytes=POOL_PAGES * page_bytes) as engine:
        runner, scheduler = engine.runner, engine.scheduler
        free_rows = len(runner.page_tables.free_rows)
        submitted, outputs, aborted = drive_storm(engine)
        radix = runner.radix_cache
        problems = []
        if outputs.keys() != submitted.keys():
            problems.append(f"{len(submitted) - len(outputs)} requests lost")
        if any(n.lock_ref for n in radix._nodes() if n is not radix.root) or radix.locked_pages:
            problems.append("a prefix still locked")
        if len(runner.page_tables.free_rows) != free_rows:
            problems.append("a page-table row not returned")
        engine.flush_cache()
        if runner.allocator.num_free != runner.allocator.num_pages:
            problems.append(f"{runner.allocator.num_pages - runner.allocator.num_free} pages leaked")
        greedy = [(rid, p, prm) for rid, (p, prm) in submitted.items() if prm.temperature == 0 and rid not in aborted]
        same = sum(engine.generate(p, prm).token_ids == outputs[rid].token_ids for rid, p, prm in greedy)
        replays = getattr(getattr(runner, "graphs", None), "replays", 0)
        summary = (f"{len(outputs)}/{len(submitted)} requests ended, {len(aborted)} aborted, "
                   f"{scheduler.num_retractions} retractions, {replays} graph replays; greedy equal to alone: "
                   f"{same}/{len(greedy)}")
        return not problems, summary + ("; " + "; ".join(problems) if problems else "")


def main() -> None:
    stages = sys.argv[1].split(",") if len(sys.argv) > 1 else STAGES
    model_path = str(random_checkpoint("qwen3-0.6b", device="cuda"))
    failures = 0
    for stage in stages:
        ok, summary = run_storm(stage, model_path)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {stage}: {summary}", flush=True)
    print(f"failures: {failures}")


if __name__ == "__main__":
    main()
