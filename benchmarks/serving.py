"""Online serving benchmark: requests arrive at a given rate at a stage's server (stage 11 by default).

    python -m benchmarks.serving --model builtin --device cpu --workload random --request-rate 4
    python -m benchmarks.serving --url http://127.0.0.1:30000 --workload random --request-rate inf

Offline benchmarks (``python -m benchmarks run``) hand every request to the
engine at once; here each request is an HTTP stream, sent at times drawn from
a Poisson process of ``--request-rate`` per second (``inf``: all at once), as
SGLang's ``bench_serving`` does. Per request it records the time to the first
streamed text (TTFT), the gaps between streamed chunks (inter-token latency:
a chunk carries the text of one step), and the end-to-end latency; it reports
their p50 / p99 and the output throughput. Without ``--url`` it starts the
server itself (``--stage``, ``--model`` and ``--engine-flags`` as for the stage's CLI). It also
reports the prefix-cache hit rate (cached / prompt tokens, from each reply's usage), which
stage 16's routing decides across replicas (``--engine-flags "--dp-size 2"``).
"""

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing as mp
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai

from benchmarks.__main__ import environment, resolve_model
from benchmarks.systems import percentile
from benchmarks.workloads import WORKLOADS, Workload, make_workload
from common.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_SEED = 10_000  # prompts no measured run uses


async def one_request(client, model: str, prompt: list[int], max_tokens: int, delay: float) -> dict:
    """Wait ``delay`` seconds, then stream one completion; return its timings (seconds)."""
    await asyncio.sleep(delay)
    start = time.perf_counter()
    stamps, tokens, cached, prompt_tokens = [], 0, 0, 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            cached = details.cached_tokens if details is not None else 0
    return dict(start=start, stamps=stamps, tokens=tokens, cached=cached, prompt_tokens=prompt_tokens)


async def one_raw_request(url: str, model: str, prompt: list[int], max_tokens: int, delay: float) -> dict:
    """``one_request`` without the official client: one HTTP/1.1 request on its own connection, the
    stream read line by line. It costs the client a few microseconds a chunk, where the official
    client's models cost tens, so what it measures is the server (SGLang's bench_serving does the same)."""
    await asyncio.sleep(delay)
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    connected = time.perf_counter()  # a connection the listen queue dropped shows here (SYN retried after 1, 3, 7 s)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    stamps, tokens, cached, prompt_tokens = [], 0, 0, 0
    status = await reader.readline()  # the status line: the server has read the request and begun the reply
    answered = time.perf_counter()
    if b" 200 " not in status:
        raise RuntimeError(f"the server answered {status.decode().strip()!r}")
    while line := await reader.readline():
        if line.startswith(b"data: [DONE]"):
            break
        if not line.startswith(b"data: {"):
            continue  # the status line, headers, chunk sizes, blank lines
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk["choices"] and chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
        if chunk.get("usage"):
            tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
            cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    writer.close()
    return dict(start=start, connected=connected, answered=answered, stamps=stamps, tokens=tokens, cached=cached, prompt_tokens=prompt_tokens)


async def run_requests(url: str, requests: list[tuple], begin: float, client: str = "openai") -> list[dict]:
    """Stream ``requests`` ((prompt, max_tokens, delay) each), their delays counted from ``begin``
    (a ``time.perf_counter()`` stamp: the same clock in every process on Linux), with the official
    openai client or the raw one."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600) as openai_client:
        model = (await openai_client.models.list()).data[0].id  # the name the server answers to
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        lag = time.perf_counter() - begin
        if client == "raw":
            coroutines = [one_raw_request(url, model, p, n, max(0.0, d - lag)) for p, n, d in requests]
        else:
            coroutines = [one_request(openai_client, model, p, n, max(0.0, d - lag)) for p, n, d in requests]
        return list(await asyncio.gather(*coroutines))


def client_process(url: str, requests: list[tuple], begin: float, client: str) -> list[dict]:
    return asyncio.run(run_requests(url, requests, begin, client))


def run_workload(url: str, workload: Workload, request_rate: float, seed: int,
                 client_processes: int = 1, client: str = "openai") -> tuple[list[dict], float]:
    """Send the workload's requests at their arrival times, from ``client_processes`` processes (the
    official client parses every chunk in Python: one process can lag behind a fast server's streams)."""
    rng = random.Random(seed)
    delays, at = [], 0.0
    for _ in workload.prompts:  # Poisson arrivals: exponential gaps between requests
        delays.append(at)
        at += 0 if request_rate == float("inf") else rng.expovariate(request_rate)
    requests = list(zip(workload.prompts, workload.max_tokens, delays))
    if client_processes == 1:
        begin = time.perf_counter()
        return asyncio.run(run_requests(url, requests, begin, client)), time.perf_counter() - begin
    begin = time.perf_counter() + 5.0  # every process has started and listed the models by then
    with concurrent.futures.ProcessPoolExecutor(client_processes, mp.get_context("spawn")) as pool:
        parts = pool.map(client_process, [url] * client_processes, [requests[i::client_processes]
                                                                   for i in range(client_processes)],
                         [begin] * client_processes, [client] * client_processes)
        results = [result for part in parts for result in part]
    return results, max(r["stamps"][-1] if r["stamps"] else r["start"] for r in results) - begin


def summarize(results: list[dict], seconds: float, request_rate: float, input_tokens: int) -> dict:
    ms = lambda v: None if v is None else round(v * 1000, 3)
    ttft = [r["stamps"][0] - r["start"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    e2e = [r["stamps"][-1] - r["start"] for r in results if r["stamps"]]
    connect = [r["connected"] - r["start"] for r in results if "connected" in r]  # the raw client only
    answer = [r["answered"] - r["start"] for r in results if "answered" in r]
    tokens = sum(r["tokens"] for r in results)
    return dict(
        request_rate=request_rate if request_rate != float("inf") else "inf",
        requests=len(results), output_tokens=tokens, seconds=round(seconds, 3),
        output_tokens_per_s=round(tokens / seconds, 2), total_tokens_per_s=round((input_tokens + tokens) / seconds, 2),
        requests_per_s=round(len(results) / seconds, 3),
        ttft_median_ms=ms(statistics.median(ttft) if ttft else None), ttft_p99_ms=ms(percentile(ttft, 99)),
        itl_median_ms=ms(statistics.median(itl) if itl else None), itl_p99_ms=ms(percentile(itl, 99)),
        e2e_median_ms=ms(statistics.median(e2e) if e2e else None), e2e_p99_ms=ms(percentile(e2e, 99)),
        **(dict(connect_median_ms=ms(statistics.median(connect)), connect_p99_ms=ms(percentile(connect, 99)),
                status_line_median_ms=ms(statistics.median(answer)), status_line_p99_ms=ms(percentile(answer, 99)))
           if connect else {}),
        cache_hit_rate=round(sum(r["cached"] for r in results) / max(sum(r["prompt_tokens"] for r in results), 1), 4),
    )


def engine_side_ttft(url: str) -> dict:
    """The engine's own time to first token (arrival in the engine to the first token), from the
    server's /metrics histogram: the bucket bounds that hold the median and the 99th percentile.
    Set beside the client's TTFT, it tells time spent before the engine from time spent in it."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    buckets = []
    for line in text.splitlines():
        if line.startswith("ladder:time_to_first_token_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    bound_at = lambda q: next(b for b, count in buckets if count >= q * total)
    return dict(engine_ttft_median_ms_at_most=bound_at(0.5) * 1000, engine_ttft_p99_ms_at_most=bound_at(0.99) * 1000)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalServer:
    """``python -m STAGE --serve`` for the length of a benchmark, started from the checkout ``tree``
    (this one by default); the constructor returns once ``/health`` answers, checked every ``poll_s``."""

    def __init__(self, model_path: str | None, device: str, port: int, flags: list[str], stage: str = "stage11_server",
                 tree: Path = ROOT, poll_s: float = 0.5):
        command = [sys.executable, "-m", stage, "--serve", "--port", str(port), "--device", device, *flags]
        if model_path:
            command += ["--model-path", model_path]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, cwd=tree)
        deadline = time.monotonic() + 600
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(poll_s)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default="builtin", help="builtin, a random real shape (qwen3-0.6b, ...) or a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=30123, help="port of the server this starts")
    parser.add_argument("--stage", default="stage11_server", help="the stage whose server this starts")
    parser.add_argument("--engine-flags", default="", help='extra server flags, e.g. "--disable-radix-cache"')
    parser.add_argument("--workload", default="random", choices=sorted(WORKLOADS))
    parser.add_argument("--size", choices=["cpu", "gpu"], help="workload size (default: from the device)")
    parser.add_argument("--requests", type=int, default=None, help="keep only the first N requests")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warm-up", action="store_true", help="measure from a cold server")
    parser.add_argument("--client", default="openai", choices=["openai", "raw"],
                        help="the official openai client, or a raw HTTP one that costs the client almost nothing")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes the requests are spread over (round robin), so the client keeps up")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    parser.add_argument("--requests-out", type=Path, default=None,
                        help="write each request's timings here (seconds from the first request's start)")
    args = parser.parse_args(argv)

    model_path, folder = resolve_model(args.model, args.device)
    size = args.size or ("gpu" if args.device.startswith("cuda") else "cpu")
    workload = make_workload(args.workload, size, ModelConfig.from_file(folder).vocab_size, requests=args.requests)
    server = None if args.url else LocalServer(model_path, args.device, args.port, args.engine_flags.split(), args.stage)
    try:
        # Warm-up, as the in-process runs have one: a fresh server's first prefills pay one-time costs
        # (kernel selection, allocator growth) that would land in the measured requests' TTFT. Its
        # prompts come from another seed, so they leave no prefix in the cache for the workload.
        if not args.no_warm_up:
            warm_up = make_workload(args.workload, size, ModelConfig.from_file(folder).vocab_size, seed=WARM_UP_SEED,
                                    requests=4)
            run_workload(args.url or server.url, warm_up, float("inf"), args.seed)
        results, seconds = run_workload(args.url or server.url, workload, args.request_rate, args.seed,
                                        args.client_processes, args.client)
        engine_ttft = engine_side_ttft(args.url or server.url)
    finally:
        if server is not None:
            server.stop()
    summary = summarize(results, seconds, args.request_rate, workload.input_tokens)
    summary.update(engine_ttft)
    summary["client"], summary["client_processes"] = args.client, args.client_processes
    report = dict(environment=environment(), workload=workload.description, model=args.model,
                  engine_kwargs={"server flags": args.engine_flags} if args.engine_flags else {},
                  results=[dict(system=f"{args.stage} {args.engine_flags} @ {summary['request_rate']} req/s".replace("  ", " "),
                                **summary)])
    print(json.dumps(summary, indent=2))
    if args.requests_out:  # to see where in the run the slow ones fall
        zero = min(r["start"] for r in results)
        at = lambda t: round(t - zero, 4)
        args.requests_out.write_text(json.dumps([
            dict(start=at(r["start"]), connected=at(r["connected"]) if "connected" in r else None,
                 answered=at(r["answered"]) if "answered" in r else None, stamps=[at(t) for t in r["stamps"]],
                 tokens=r["tokens"], prompt_tokens=r["prompt_tokens"]) for r in results]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
