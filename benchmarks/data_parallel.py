"""Data-parallel replicas (stage 16) through the server: one replica against two, per routing method.

    python -m benchmarks.data_parallel [--model builtin] [--device cpu] [--repeat 2] [--out FILE]
    python -m benchmarks.data_parallel --model qwen3-0.6b --device cuda --share-gpu \\
        --kv-cache-bytes 24000000000 --request-rate 16 --settings "dp 1;dp 2, cache_aware"

For each workload (``random``, and ``prefix-mix``: groups of requests sharing
long prefixes, shuffled) it sends the requests to stage 16's server in each
setting (``--dp-size 1``; ``--dp-size 2`` with each ``--load-balance-method``)
as streams, all at once or at ``--request-rate`` per second
(``benchmarks/serving.py``), and records output tok/s, the median time to first
token and the prefix-cache hit rate.

Every setting's server starts once and stays up (an idle engine sleeps on its
pipe), so rounds interleave the settings without restarts: after a few warm-up
requests, round k sends every setting the same requests, drawn with seed k (new
prompts each round, so no round finds the one before it in the cache). Each
setting reports its median round, and its speed against dp 1 as the median of
the rounds' ratios. ``--kv-cache-bytes`` is the KV memory of a setting, split evenly between
its replicas; ``--share-gpu`` puts the replicas on one GPU (``--gpu-id-step 0``).
"""

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.__main__ import environment, resolve_model
from benchmarks.serving import WARM_UP_SEED, LocalServer, run_workload, summarize
from benchmarks.workloads import make_workload
from common.config import ModelConfig

SETTINGS = {"dp 1": "--dp-size 1", "dp 2, round_robin": "--dp-size 2 --load-balance-method round_robin",
            "dp 2, shortest_queue": "--dp-size 2 --load-balance-method shortest_queue",
            "dp 2, cache_aware": "--dp-size 2 --load-balance-method cache_aware"}


def server_flags(name: str, kv_cache_bytes: int | None, share_gpu: bool) -> list[str]:
    """A setting's server flags: its replicas, each with its share of the KV memory."""
    flags = SETTINGS[name].split()
    replicas = int(flags[flags.index("--dp-size") + 1])
    if kv_cache_bytes is not None:
        flags += ["--kv-cache-bytes", str(kv_cache_bytes // replicas)]
    if share_gpu and replicas > 1:
        flags += ["--gpu-id-step", "0"]
    return flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default="random,prefix-mix", type=lambda s: s.split(","))
    parser.add_argument("--settings", default=";".join(SETTINGS), type=lambda s: s.split(";"),
                        help=f"settings to compare, separated by ';' (from: {'; '.join(SETTINGS)})")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    parser.add_argument("--kv-cache-bytes", type=int, default=None, help="KV memory of each setting, split between its replicas")
    parser.add_argument("--share-gpu", action="store_true", help="replicas share one GPU (--gpu-id-step 0)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--port", type=int, default=30125, help="the first setting's port; the next ones follow")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = [name for name in args.settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    model_path, folder = resolve_model(args.model, args.device)
    size = "gpu" if args.device.startswith("cuda") else "cpu"
    vocab = ModelConfig.from_file(folder).vocab_size
    servers = {}
    try:
        for i, name in enumerate(args.settings):
            servers[name] = LocalServer(model_path, args.device, args.port + i,
                                        server_flags(name, args.kv_cache_bytes, args.share_gpu), "stage16_data_parallel")
        for server in servers.values():  # warm up: the first requests of a fresh server pay one-time costs
            run_workload(server.url, make_workload(args.workloads[0], size, vocab, seed=WARM_UP_SEED, requests=4),
                         float("inf"), seed=0)
        rounds = {(w, name): [] for w in args.workloads for name in args.settings}
        for repeat in range(args.repeat):
            for (workload_name, name), runs in rounds.items():
                workload = make_workload(workload_name, size, vocab, seed=repeat)
                results, seconds = run_workload(servers[name].url, workload, args.request_rate, seed=repeat)
                runs.append(summarize(results, seconds, args.request_rate, workload.input_tokens))
                print(repeat, workload_name, name, {k: runs[-1][k] for k in ("output_tokens_per_s", "ttft_median_ms",
                                                                            "cache_hit_rate")}, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    report = []
    for (workload_name, name), runs in rounds.items():
        speeds = [r["output_tokens_per_s"] for r in runs]
        median = sorted(runs, key=lambda r: r["output_tokens_per_s"])[len(runs) // 2]
        report.append(dict(workload=workload_name, system=name, flags=" ".join(server_flags(name, args.kv_cache_bytes, args.share_gpu)),
                           runs=speeds, min=min(speeds), max=max(speeds), median_of=len(runs), **median))
    for r in report:  # rounds differ in their prompts: compare within a round, then take the median
        base = next((x for x in report if x["workload"] == r["workload"] and x["system"] == "dp 1"), None)
        if base is not None:
            r["vs_dp1_per_round"] = [round(a / b, 3) for a, b in zip(r["runs"], base["runs"])]
            r["vs_dp1"] = statistics.median(r["vs_dp1_per_round"])
    out = dict(environment=environment(), model=args.model, device=args.device, repeat=args.repeat,
               request_rate=args.request_rate if args.request_rate != float("inf") else "inf",
               kv_cache_bytes=args.kv_cache_bytes, share_gpu=args.share_gpu, results=report)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
