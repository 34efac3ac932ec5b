"""Seconds from launching a server to its first healthy answer, trees side by side.

    python -m benchmarks.server_start --stage stage19_pipeline_parallel --repeats 4
    python -m benchmarks.server_start --trees .,/tmp/base --repeats 4 --out start.json

A server is ready when ``GET /health`` answers 200. Its start-up is the front
end's imports, the engine process's (forked from the forkserver, which imports
torch first) and its engine build, then what the front end still has to do
once the engine is ready (its tokenizer). ``--trees`` names checkouts to
compare (this one against the commit before, say): they are launched in turn,
one start of each per round, and each tree's median over the rounds is reported.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def seconds_to_healthy(command: list[str], cwd: str | Path, port: int, timeout_s: float = 300) -> float:
    """Launch ``command`` (a server on ``port``), time it until /health answers 200, then stop it."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(Path(cwd).resolve())})
        try:
            while not healthy(url):
                if process.poll() is not None or time.monotonic() - start > timeout_s:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start:\n{log.read()[-3000:]}")
                time.sleep(0.02)
            return time.monotonic() - start
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def commit(tree: str) -> str | None:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="stage19_pipeline_parallel")
    parser.add_argument("--trees", default=".", help="comma-separated checkouts, launched in turn")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    trees = args.trees.split(",")
    runs: dict[str, list[float]] = {tree: [] for tree in trees}
    for _ in range(args.repeats):
        for tree in trees:
            port = free_port()
            command = [sys.executable, "-m", args.stage, "--serve", "--port", str(port), "--device", args.device]
            runs[tree].append(round(seconds_to_healthy(command, tree, port), 3))
    results = [dict(tree=tree, commit=commit(tree), seconds_median=statistics.median(runs[tree]),
                    seconds_runs=runs[tree]) for tree in trees]
    for r in results:
        print(f"{r['tree']} ({r['commit']}): {r['seconds_median']:.2f} s to healthy, median of {r['seconds_runs']}")
    if args.out:
        from benchmarks.__main__ import environment

        report = dict(environment=environment(), stage=args.stage, device=args.device, results=results)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
