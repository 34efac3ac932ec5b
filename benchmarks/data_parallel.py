"""Data-parallel replicas (stage 16) through the server: one replica against two, per routing method.

    python -m benchmarks.data_parallel [--model builtin] [--device cpu] [--repeat 2] [--out FILE]

For each workload (``random``, and ``prefix-mix``: groups of requests sharing
long prefixes, shuffled) it starts stage 16's server once per setting
(``--dp-size 1``; ``--dp-size 2`` with each ``--load-balance-method``), sends
every request at once as streams (``benchmarks/serving.py``), and records
output tok/s, the median time to first token and the prefix-cache hit rate.
Settings run interleaved, ``--repeat`` rounds; each reports its median round.
"""

import argparse
import asyncio
import json
from pathlib import Path

from benchmarks.__main__ import environment, resolve_model
from benchmarks.serving import LocalServer, run_workload, summarize
from benchmarks.workloads import make_workload
from common.config import ModelConfig

SETTINGS = {"dp 1": "--dp-size 1", "dp 2, round_robin": "--dp-size 2 --load-balance-method round_robin",
            "dp 2, shortest_queue": "--dp-size 2 --load-balance-method shortest_queue",
            "dp 2, cache_aware": "--dp-size 2 --load-balance-method cache_aware"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default="random,prefix-mix", type=lambda s: s.split(","))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--port", type=int, default=30125)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model_path, folder = resolve_model(args.model, args.device)
    size = "gpu" if args.device.startswith("cuda") else "cpu"
    vocab = ModelConfig.from_file(folder).vocab_size
    rounds = {(w, name): [] for w in args.workloads for name in SETTINGS}
    for repeat in range(args.repeat):
        for (workload_name, name), runs in rounds.items():
            workload = make_workload(workload_name, size, vocab)
            server = LocalServer(model_path, args.device, args.port, SETTINGS[name].split(), "stage16_data_parallel")
            try:
                results, seconds = asyncio.run(run_workload(server.url, workload, float("inf"), seed=0))
            finally:
                server.stop()
            runs.append(summarize(results, seconds, float("inf"), workload.input_tokens))
            print(repeat, workload_name, name, {k: runs[-1][k] for k in ("output_tokens_per_s", "ttft_median_ms",
                                                                        "cache_hit_rate")}, flush=True)
    report = []
    for (workload_name, name), runs in rounds.items():
        speeds = [r["output_tokens_per_s"] for r in runs]
        median = sorted(runs, key=lambda r: r["output_tokens_per_s"])[len(runs) // 2]
        report.append(dict(workload=workload_name, system=name, flags=SETTINGS[name], runs=speeds,
                           min=min(speeds), max=max(speeds), median_of=len(runs), **median))
    for r in report:
        base = next(x for x in report if x["workload"] == r["workload"] and x["system"] == "dp 1")
        r["vs_dp1"] = round(r["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
    out = dict(environment=environment(), model=args.model, device=args.device, repeat=args.repeat, results=report)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
