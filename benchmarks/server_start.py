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
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.serving import LocalServer, free_port


def seconds_to_healthy(stage: str, tree: str | Path, device: str) -> float:
    """Start ``python -m STAGE --serve`` from ``tree``, time it until /health answers 200, then stop it."""
    start = time.monotonic()
    server = LocalServer(None, device, free_port(), [], stage, tree=Path(tree), poll_s=0.02)
    seconds = time.monotonic() - start
    server.stop()
    return seconds


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
            runs[tree].append(round(seconds_to_healthy(args.stage, tree, args.device), 3))
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
