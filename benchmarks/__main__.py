"""Command line of the benchmark harness.

    python -m benchmarks run --stage stage01_core --workload single --device cpu
    python -m benchmarks run --compare stage01_core,hf-generate --workload random --model qwen3-0.6b --device cuda

Results print as a table and are written as JSON (with machine, torch version
and git commit) to --out.
"""

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.checkpoints import SHAPES, random_checkpoint
from benchmarks.flops import peak_flops, prompt_flops
from benchmarks.systems import run_system
from benchmarks.workloads import WORKLOADS, make_workload
from common.config import ModelConfig
from common.loader import resolve_model_path


def cpu_model() -> str | None:
    """The CPU's name as the kernel reports it (Linux), so a CPU run says what it ran on."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        return None


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(machine=platform.machine(), cpu=cpu_model(), cpu_count=torch.get_num_threads(), gpu=gpu,
                torch=torch.__version__, python=platform.python_version(), git_commit=commit or None)


def make_report(args, workload, results: list[dict], config: ModelConfig | None = None) -> dict:
    base = results[0]["output_tokens_per_s"]
    for r in results:
        r["speed_vs_first"] = round(r["output_tokens_per_s"] / base, 3)
    peak = peak_flops(torch.cuda.get_device_name()) if args.device.startswith("cuda") else None
    if workload.name == "prefill" and config is not None and peak:  # the share of the GPU's peak the model math used
        flops = sum(prompt_flops(config, len(p)) for p in workload.prompts)
        for r in results:
            r["model_flops_utilization"] = round(flops / r["seconds"] / peak, 4)
    return dict(environment=environment(), workload=workload.description, model=args.model,
                engine_kwargs=args.engine_kwargs, results=results)


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput, with every run's throughput listed beside it."""
    ordered = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    return dict(ordered[(len(ordered) - 1) // 2], output_tokens_per_s_runs=[r["output_tokens_per_s"] for r in runs])


def resolve_model(name: str, device: str):
    """``builtin``, a random real shape (qwen3-0.6b, ...) or a checkpoint path -> (model_path, folder)."""
    if name == "builtin":
        return None, resolve_model_path(None)
    if name in SHAPES:
        folder = random_checkpoint(name, device="cuda" if device.startswith("cuda") else "cpu")
        return str(folder), folder
    return name, resolve_model_path(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one workload on one or more systems, side by side")
    run.add_argument("--stage", help="one system (a stage folder name, hf-generate, hf-generate-batch, hf-continuous-batching)")
    run.add_argument("--compare", help="comma-separated systems, run in this order in one process")
    run.add_argument("--workload", default="single", choices=sorted(WORKLOADS))
    run.add_argument("--model", default="builtin", help=f"builtin, {', '.join(SHAPES)}, or a checkpoint path")
    run.add_argument("--device", default="cpu")
    run.add_argument("--size", choices=["cpu", "gpu"], help="workload size (default: from the device)")
    run.add_argument("--requests", type=int, default=None, help="keep only the first N requests")
    run.add_argument("--engine-kwargs", type=json.loads, default={},
                     help='JSON engine options, given to the stages that accept them, e.g. \'{"chunked_prefill_size": 256}\'')
    run.add_argument("--repeat", type=int, default=1,
                     help="run the systems N times, interleaved (A B A B ...), and report each one's median run")
    run.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    args = parser.parse_args(argv)

    systems = (args.compare or args.stage or "stage01_core").split(",")
    model_path, folder = resolve_model(args.model, args.device)
    size = args.size or ("gpu" if args.device.startswith("cuda") else "cpu")
    config = ModelConfig.from_file(folder)
    workload = make_workload(args.workload, size, config.vocab_size, requests=args.requests)
    print(f"{workload.name}: {workload.description}; model {args.model}; device {args.device}", file=sys.stderr)
    runs = {system: [] for system in systems}
    for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits every system alike
        for system in systems:
            runs[system].append(run_system(system, model_path, folder, workload, args.device, args.engine_kwargs))
            print(json.dumps(runs[system][-1]), file=sys.stderr)
            report = make_report(args, workload, [median_run(r) for r in runs.values() if r], config)
            if args.out:  # after every run, so a run cut short by a time limit keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2))
    results = report["results"]
    header = f"{'system':<20}{'out tok/s':>12}{'total tok/s':>13}{'ttft p50 ms':>13}{'itl p50 ms':>12}{'x first':>9}"
    print(header)
    for r in results:
        print(f"{r['system']:<20}{r['output_tokens_per_s']:>12}{r['total_tokens_per_s']:>13}"
              f"{r['ttft_median_ms']!s:>13}{r['itl_median_ms']!s:>12}{r['speed_vs_first']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
