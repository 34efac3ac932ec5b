"""Prefill-decode disaggregation against one colocated engine, under bursts of long prompts.

    python -m benchmarks.pd_disaggregation --model builtin --device cpu
    python -m benchmarks.pd_disaggregation --model qwen3-0.6b --device cuda --repeat 2 --out results.json

The workload is the case disaggregation is for: steady decoders (short
prompts, long answers) all running from the start, and bursts of long prompts
(short answers) arriving while they decode. In one engine each burst's prefill
shares steps with the decoders, which shows in their time between tokens;
disaggregated, a prefill server computes the bursts and hands their K/V to a
decode server that only decodes.

Two systems, each behind HTTP and streamed with the raw client, run in
interleaved repeats: stage 17 colocated (chunked prefill), and stage 18 as a
router, one prefill server and one decode server on the same device. Reported:
the decoders' time between tokens (p50, p99, and p99 over p50), the bursts'
time to first token, output throughput, and for the disaggregated system the
K/V transfer speed and mean handover time from the decode server's /metrics.
On one GPU both processes share its compute (no MPS: the two take turns), so
what this measures is the scheduling, not the isolation two GPUs would give.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.__main__ import environment, resolve_model
from benchmarks.serving import ROOT, LocalServer, free_port, run_requests
from benchmarks.systems import percentile
from common.config import ModelConfig

SIZES = {  # decoders, their prompt and output lengths; bursts, prompts per burst, burst prompt length, gap (s)
    "gpu": dict(decoders=32, decoder_prompt=256, decoder_output=1024, bursts=4, burst_size=8, burst_prompt=4096,
                burst_output=8, every_s=1.5),
    "cpu": dict(decoders=4, decoder_prompt=16, decoder_output=64, bursts=2, burst_size=2, burst_prompt=384,
                burst_output=4, every_s=1.0),
}


def prompt_burst_requests(size: dict, vocab_size: int, seed: int) -> tuple[list[tuple], int]:
    """(prompt, max_tokens, delay) per request, decoders first; and how many decoders."""
    rng = random.Random(seed)
    prompt = lambda n: [rng.randrange(3, vocab_size) for _ in range(n)]
    requests = [(prompt(size["decoder_prompt"]), size["decoder_output"], 0.0) for _ in range(size["decoders"])]
    for burst in range(size["bursts"]):
        at = (burst + 1) * size["every_s"]
        requests += [(prompt(size["burst_prompt"]), size["burst_output"], at) for _ in range(size["burst_size"])]
    return requests, size["decoders"]


class Router:
    """``python -m stage18_pd_disaggregation --pd-router`` for the length of a run."""

    def __init__(self, prefill: str, bootstrap_port: int, decode: str, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "stage18_pd_disaggregation", "--pd-router", "--prefill",
                                         prefill, str(bootstrap_port), "--decode", decode, "--port", str(port)], cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the router did not start") from None
                time.sleep(0.3)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


def summarize(results: list[dict], decoders: int, seconds: float) -> dict:
    ms = lambda v: round(v * 1000, 3)
    gaps = [b - a for r in results[:decoders] for a, b in zip(r["stamps"], r["stamps"][1:])]
    ttft = [r["stamps"][0] - r["start"] for r in results[decoders:] if r["stamps"]]
    tokens = sum(r["tokens"] for r in results)
    p50, p99 = statistics.median(gaps), percentile(gaps, 99)
    return dict(decode_itl_median_ms=ms(p50), decode_itl_p99_ms=ms(p99), decode_itl_p99_over_median=round(p99 / p50, 2),
                burst_ttft_median_ms=ms(statistics.median(ttft)), burst_ttft_p99_ms=ms(percentile(ttft, 99)),
                output_tokens=tokens, seconds=round(seconds, 3), output_tokens_per_s=round(tokens / seconds, 2))


def run_once(url: str, requests: list[tuple], decoders: int, warm_up: list[tuple]) -> dict:
    import asyncio

    asyncio.run(run_requests(url, warm_up, time.perf_counter(), "raw"))
    begin = time.perf_counter()
    results = asyncio.run(run_requests(url, requests, begin, "raw"))
    return summarize(results, decoders, max(r["stamps"][-1] for r in results) - begin)


def colocated(model_path, device, requests, decoders, warm_up, kv_bytes: int) -> dict:
    server = LocalServer(model_path, device, free_port(), ["--kv-cache-bytes", str(kv_bytes)], "stage17_hicache")
    try:
        return run_once(server.url, requests, decoders, warm_up)
    finally:
        server.stop()


def disaggregated(model_path, device, requests, decoders, warm_up, kv_bytes: int) -> dict:
    """A prefill server (a quarter of the pool: it holds a prompt only until it is handed over), a
    decode server (the rest) and the router."""
    bootstrap = free_port()
    prefill = LocalServer(model_path, device, free_port(), ["--disaggregation-mode", "prefill",
                                                            "--disaggregation-bootstrap-port", str(bootstrap),
                                                            "--kv-cache-bytes", str(kv_bytes // 4)],
                          "stage18_pd_disaggregation")
    decode = router = None
    try:
        decode = LocalServer(model_path, device, free_port(), ["--disaggregation-mode", "decode",
                                                               "--kv-cache-bytes", str(kv_bytes - kv_bytes // 4)],
                             "stage18_pd_disaggregation")
        router = Router(prefill.url, bootstrap, decode.url, free_port())
        summary = run_once(router.url, requests, decoders, warm_up)
        samples = metrics(decode.url)
        summary.update(kv_transfer_speed_gb_s=round(samples.get("ladder:kv_transfer_speed_gb_s", 0.0), 3),
                       handover_mean_ms=round(samples.get("ladder:kv_transfer_latency_ms", 0.0), 3),
                       handovers_failed=samples.get('ladder:handovers{state="failed"}', 0.0))
        return summary
    finally:
        for process in (router, decode, prefill):
            if process is not None:
                process.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pd_disaggregation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="builtin, a random real shape (qwen3-0.6b, ...) or a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), help="workload size (default: from the device)")
    parser.add_argument("--kv-cache-bytes", type=int, default=None,
                        help="KV pool of the colocated engine, split 1:3 between prefill and decode (default: "
                             "256 MiB on the CPU, 16 GiB on a GPU)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repeats of both systems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    model_path, folder = resolve_model(args.model, args.device)
    size_name = args.size or ("gpu" if args.device.startswith("cuda") else "cpu")
    size, vocab = SIZES[size_name], ModelConfig.from_file(folder).vocab_size
    kv_bytes = args.kv_cache_bytes or (16 << 30 if args.device.startswith("cuda") else 256 << 20)
    requests, decoders = prompt_burst_requests(size, vocab, args.seed)
    warm_up = [(p, 4, 0.0) for p, _, _ in prompt_burst_requests(size, vocab, args.seed + 10_000)[0][-4:]]
    runs = {"stage17 colocated": [], "stage18 disaggregated (1 prefill + 1 decode, one device)": []}
    for _ in range(args.repeat):
        for (name, results), system in zip(runs.items(), (colocated, disaggregated)):
            results.append(system(model_path, args.device, requests, decoders, warm_up, kv_bytes))
            print(name, json.dumps(results[-1]), flush=True)
    median = lambda rs: sorted(rs, key=lambda r: r["decode_itl_p99_ms"])[len(rs) // 2]
    report = dict(environment=environment(), model=args.model, workload=dict(size_name=size_name, **size),
                  kv_cache_bytes=kv_bytes, results=[dict(system=name, **median(rs), runs=rs) for name, rs in runs.items()])
    print(json.dumps(report["results"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
