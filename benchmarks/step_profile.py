"""Where a stage's GPU decode step goes: wall time, GPU time, and how busy the GPU is.

    python -m benchmarks.step_profile STAGE [--requests 256] [--temperature 0.6] [--table] [--option NAME=VALUE ...]

Queues nano-vllm's workload (input and output lengths uniform in 100..1024)
on a random Qwen3-0.6B, steps until every prompt is prefilled, then times 20
consecutive decode steps and profiles 10 more with torch.profiler. The 20
steps are timed as one stretch (the mean), with no sync between them, so a
stage that overlaps a step's host work with the GPU (stage 10) keeps doing so.
"kernels_per_step" counts the kernels and copies the profiler saw (inside a CUDA
graph's replay too, where the profiler can see them). "GPU busy" is the GPU time per step the profiler saw (the union of kernel and
copy intervals) divided by that mean wall time: the share of a step the GPU
spends computing rather than waiting for the host. (The profiler slows the
host, so its own wall time would understate it.)
"""

import argparse
import ast
import importlib
import json
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.checkpoints import random_checkpoint


def kernel_time_us(prof) -> float:
    """Microseconds in which at least one GPU kernel or copy ran (the union of their intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def kernel_count(prof) -> int:
    """Kernels and copies the profiler saw on the GPU (inside a CUDA graph's replay too)."""
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def literal(text: str):
    """An option's value as Python reads it (True, 8, 0.5), or the text itself (gather)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_profile")
    parser.add_argument("stage")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--table", action="store_true", help="also print the profiler's top ops")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an engine keyword, e.g. attention_backend=gather (repeatable)")
    args = parser.parse_args(argv)
    options = {name: literal(value) for name, value in (option.split("=", 1) for option in args.option)}
    engine = importlib.import_module(args.stage).Engine(model_path=str(random_checkpoint(args.model, device="cuda")), device="cuda",
                                                        **options)
    rng = random.Random(0)
    vocab = engine.config.vocab_size
    for _ in range(args.requests):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(100, 1024))]
        engine.add_request(prompt, max_tokens=rng.randint(100, 1024), ignore_eos=True, temperature=args.temperature)
    scheduler = engine.scheduler
    while scheduler.waiting or any(r.num_cached < r.seq_len - 1 for r in scheduler.running):
        engine.step()
    for _ in range(3):  # reach the steady state (with overlap: one step in flight)
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / 20
    batch = len(scheduler.running)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_us = kernel_time_us(prof)
    kernels = kernel_count(prof)
    result = dict(stage=args.stage, options=options, batch=batch, temperature=args.temperature,
                  step_ms=round(step_s * 1000, 2), decode_tok_per_s=round(batch / step_s, 1),
                  profiled_step_ms=round(wall * 100, 2), gpu_ms_per_step=round(gpu_us / 10 / 1000, 2),
                  gpu_busy=round(gpu_us / 10 / 1e6 / step_s, 3), kernels_per_step=round(kernels / 10, 1))
    if args.table:
        print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))
    print(json.dumps(result), flush=True)
    engine.shutdown()
    return result


if __name__ == "__main__":
    main()
