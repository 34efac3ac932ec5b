"""KV memory of one mixed-length workload: stage01's contiguous reservations vs pages in use.

    python -m benchmarks.kv_memory [--model PATH] [--budget-fraction 0.4]

Reports (1) the KV bytes stage01 reserves (every request's prompt + max_tokens, all at once),
(2) the peak KV bytes stage02 actually has in pages, and (3) under a pool of a fraction of (1),
the most requests running at once in stage02 (admission promises the worst case) and stage04
(admission promises part of it and retracts when wrong).
"""

import argparse
import importlib
import json

from benchmarks.workloads import make_workload
from common.config import ModelConfig
from common.loader import resolve_model_path
from common.sampling import SamplingParams


def watch(engine):
    """Record, per forward step, the batch size and the pages in use."""
    log, original = [], engine.runner.step

    def step(requests, *args):
        out = original(requests, *args)
        log.append((len(requests), engine.runner.allocator.num_pages - engine.runner.allocator.num_free))
        return out

    engine.runner.step = step
    return log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_memory")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: built-in model)")
    parser.add_argument("--budget-fraction", type=float, default=0.4)
    args = parser.parse_args(argv)
    folder = resolve_model_path(args.model)
    config = ModelConfig.from_file(folder)
    workload = make_workload("random", "cpu", config.vocab_size)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in workload.max_tokens]
    bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # fp32
    reserved = sum(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens)) * bytes_per_token
    page = 16
    stage02 = importlib.import_module("stage02_paged").Engine(model_path=str(folder), device="cpu", page_size=page)
    log = watch(stage02)
    stage02.generate_batch(workload.prompts, params)
    peak_in_use = max(pages for _, pages in log) * page * bytes_per_token
    budget = int(reserved * args.budget_fraction)
    concurrency = {}
    for stage in ("stage02_paged", "stage04_batching"):
        engine = importlib.import_module(stage).Engine(model_path=str(folder), device="cpu", page_size=page, kv_cache_bytes=budget)
        log = watch(engine)
        outputs = engine.generate_batch(workload.prompts, params)
        assert [o.completion_tokens for o in outputs] == workload.max_tokens
        concurrency[stage] = max(size for size, _ in log)
    report = dict(workload=workload.description, stage01_reserved_bytes=reserved, stage02_peak_bytes_in_use=peak_in_use,
                  budget_bytes=budget, most_running_at_once=concurrency)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
