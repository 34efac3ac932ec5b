"""The HTTP front end's own cost per streamed token, with a scripted engine in place of the model.

    python -m benchmarks.front_end --stage stage16_data_parallel --requests 256 --max-tokens 200

Through a server, every generated token crosses the engine's pipe, is routed
to its request's coroutine, becomes a JSON chunk and is written to a socket.
On a GPU that work can cost more than the GPU's step (issue 45: 256 streams at
about 90 steps a second is 23,000 chunks a second). To measure it alone, the
server here runs with an engine process that computes nothing: each step it
gives every running request one token (``--step-ms`` apart), as fast as a GPU
would. A lightweight client in another process streams every request and
counts the chunks. Reported: tokens per second delivered, the ideal (one
token per request per step), time to first chunk, and the front end's CPU
seconds per 1,000 tokens (the number to lower: it does not depend on how
busy the machine is).
"""

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def scripted_engine_process(script: dict, conn, engine_kwargs: dict, max_queued_requests, *rest) -> None:
    """An engine loop without a model: one token per running request per step, ``step_ms`` apart.
    Prompts are "prefilled" first, ``prefill_chunk`` tokens a step in arrival order (chunked prefill),
    each step longer by ``prefill_ms_per_1k`` per 1,000 of them; a request's first token comes in the
    step that finishes its prompt. Outputs carry arrival and token times, as the engine's do."""
    import importlib

    stage = importlib.import_module(script["stage"] + ".engine_process")
    request_module = importlib.import_module(script["stage"] + ".request")
    heartbeat = rest[1] if len(rest) > 1 else None
    if heartbeat is not None:
        import threading

        threading.Thread(target=stage.beat, args=(heartbeat,), daemon=True).start()
    ready = stage.EngineReady(script["model_folder"], 4096)
    conn.send(ready)
    live: dict[str, dict] = {}  # rid -> its state, in arrival order
    step_s, chunk = script["step_ms"] / 1000, script.get("prefill_chunk", 2048)
    prefill_s_per_token = script.get("prefill_ms_per_1k", 0.0) / 1e6
    next_step = time.perf_counter()
    while True:
        if not live:
            conn.poll(None)
        updates = []
        while conn.poll():
            message = conn.recv()
            if message == stage.SHUTDOWN:
                return
            if isinstance(message, stage.GenerateRequest):
                live[message.rid] = dict(left=message.params.max_tokens, times=[], prompt=len(message.prompt_ids),
                                         to_prefill=len(message.prompt_ids), arrival=time.perf_counter())
                updates.append(stage.RequestUpdate(message.rid))
            elif isinstance(message, stage.AbortRequest):
                live.pop(message.rid, None)
        budget = chunk
        for state in live.values():  # this step's prefill: prompts in arrival order, up to the chunk
            n = min(state["to_prefill"], budget)
            state["to_prefill"] -= n
            budget -= n
        time.sleep(max(0.0, next_step + (chunk - budget) * prefill_s_per_token - time.perf_counter()))
        next_step = time.perf_counter() + step_s
        for rid, state in list(live.items()):
            if state["to_prefill"]:
                continue
            state["left"] -= 1
            state["times"].append(time.perf_counter())
            update = stage.RequestUpdate(rid, text=" tok")
            if state["left"] == 0:
                given = len(state["times"])
                update.output = request_module.GenerateOutput(" tok" * given, [7] * given, "length", state["prompt"], 0,
                                                              given, arrival_time=state["arrival"],
                                                              token_times=state["times"])
                del live[rid]
            updates.append(update)
        stats = dict(running=len(live), waiting=0, pages_total=1, pages_used=0, pages_cached=0, generated_tokens=0,
                     spec_verify_ct=0, spec_tokens=0)
        conn.send(stage.UpdateBatch(updates, stats))


def serve_scripted(stage: str, port: int, model_folder: str, step_ms: float, prefill_ms_per_1k: float = 0.0) -> None:
    """The stage's real server, its engine processes replaced by ``scripted_engine_process``."""
    import importlib

    handle_module = importlib.import_module(stage + ".engine_handle")  # what starts an engine process
    script = dict(stage=stage, model_folder=model_folder, step_ms=step_ms, prefill_ms_per_1k=prefill_ms_per_1k)
    handle_module.run_engine_process = functools.partial(scripted_engine_process, script)
    args = importlib.import_module(stage + ".server_args").ServerArgs(model_path=model_folder, device="cpu", port=port,
                                                                      served_model_name="m")
    importlib.import_module(stage + ".http_server").serve(args)


async def stream_one(port: int, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """One streamed completion over a raw socket: (start, first chunk time, chunks with text)."""
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "stream": True}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    first, chunks = 0.0, 0
    while line := await reader.readline():
        if line.startswith(b"data: {") and b'" tok"' in line:
            chunks += 1
            first = first or time.perf_counter()
        elif line.startswith(b"data: [DONE]"):
            break
    writer.close()
    return start, first, chunks


async def run_clients(port: int, requests: int, max_tokens: int) -> tuple[list, float]:
    begin = time.perf_counter()
    results = await asyncio.gather(*(stream_one(port, [5, 6, 7 + i], max_tokens) for i in range(requests)))
    return results, time.perf_counter() - begin


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.front_end", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="stage16_data_parallel")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=11.0, help="the scripted engine's step (an H100's at 256)")
    parser.add_argument("--prefill-ms-per-1k", type=float, default=0.0,
                        help="each step is longer by this per 1,000 prompt tokens it prefills (2,048 a step)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from common.loader import resolve_model_path

    # Only a tokenizer is used: the built-in model's, or $QWEN3_LADDER_TOKENIZER's (a GPU box has no built-in model).
    folder = os.environ.get("QWEN3_LADDER_TOKENIZER") or str(resolve_model_path(None))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = mp.get_context("spawn").Process(target=serve_scripted, args=(args.stage, port, folder, args.step_ms,
                                                                         args.prefill_ms_per_1k))
    server.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.is_alive(), "the server did not start"
                time.sleep(0.2)
        asyncio.run(run_clients(port, 4, 4))  # warm-up
        cpu_before = cpu_seconds(server.pid)
        results, seconds = asyncio.run(run_clients(port, args.requests, args.max_tokens))
        cpu = cpu_seconds(server.pid) - cpu_before
    finally:
        server.terminate()
        server.join(30)
    tokens = sum(chunks for _, _, chunks in results)
    ttft = [first - start for start, first, _ in results if first]
    summary = dict(
        stage=args.stage, requests=args.requests, max_tokens=args.max_tokens, step_ms=args.step_ms,
        tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1),
        ideal_tokens_per_s=round(args.requests * 1000 / args.step_ms, 1),
        ttft_median_ms=round(statistics.median(ttft) * 1000, 1), ttft_max_ms=round(max(ttft) * 1000, 1),
        front_end_cpu_s_per_1000_tokens=round(cpu / tokens * 1000, 4),
    )
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    assert tokens == args.requests * args.max_tokens, "some chunks were lost"
    return 0


if __name__ == "__main__":
    sys.exit(main())
