"""Worker faults on the device's own backend: NCCL across two GPUs (gloo on the CPU).

``tests/ladder/test_worker_faults.py`` checks these cases with gloo, where a
collective that waits too long raises. On NCCL the host does not wait inside
a collective: it waits on the GPU, and a collective that never completes is
found by torch's watchdog, which may end the whole process. So each case here
runs in a process of its own, with a hard time limit, and the report says
what the caller saw, whatever it was:

    killed   rank 1 is killed (SIGKILL) between two requests
    raises   rank 1 raises inside its 3rd step
    hangs    rank 1 sleeps inside its 3rd step
    oom      rank 0 runs out of memory inside a step (simulated as in test_out_of_memory.py)
    idle     the engine sits idle for twice dist_timeout, then serves

A case is ok when the fault ends in ``WorkerFailure`` within dist_timeout plus
a margin (``idle``: when the engine serves again), and no worker outlives the
case. Run from the repository root on a machine with two GPUs:

    python -m benchmarks.gpu_worker_faults [--device cuda] [--stage stage07_tp] [--model PATH]
"""

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / d) for d in ("", "ladder")]
from test_out_of_memory import LONG, little_memory
from worker_faults import faulty_worker_group

CASES = ["killed", "raises", "hangs", "oom", "idle"]
PROMPT = [5, 17, 300, 42, 9]
GREEDY = dict(max_tokens=6, temperature=0, ignore_eos=True)
MARGIN_S = 10  # start-up excluded: the failing call may take dist_timeout plus this


def run_case(case: str, device: str, stage: str, model: str, dist_timeout: float) -> dict:
    """One case in this process; returns what happened (the parent prints it)."""
    module = importlib.import_module(stage)
    if case in ("raises", "hangs"):  # rank 1 fails at its third forward (tests/worker_faults.py)
        module.engine.WorkerGroup = faulty_worker_group(stage, 1, "raise" if case == "raises" else "hang", 3)
    engine = module.Engine(model_path=model, device=device, tp_size=2, dist_timeout=dist_timeout)
    print(json.dumps({"workers": [p.pid for p in engine.workers.processes]}), flush=True)
    prompt = PROMPT
    if case not in ("raises", "hangs"):  # those fail inside the first request
        engine.generate(PROMPT, **GREEDY)
    if case == "killed":
        os.kill(engine.workers.processes[0].pid, signal.SIGKILL)
        engine.workers.processes[0].join(timeout=10)
    elif case == "oom":
        engine.runner.model.forward = little_memory(engine, engine.runner.model.forward)
        prompt = LONG
    elif case == "idle":
        time.sleep(2 * dist_timeout)
    start = time.monotonic()
    try:
        engine.generate(prompt, **GREEDY)
        outcome = "served"
    except module.parallel.WorkerFailure as error:
        outcome = "WorkerFailure: " + str(error).splitlines()[0]
    except Exception as error:  # noqa: BLE001 - the report says what it was
        outcome = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    seconds = time.monotonic() - start
    engine.shutdown()
    return {"outcome": outcome, "seconds": round(seconds, 1)}


def alive(pid: int) -> bool:
    """Whether a process is still running (a zombie, dead but not yet collected, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def check(case: str, args) -> bool:
    """Run one case in a child process and print ``ok``/``FAIL`` with what it saw."""
    command = [sys.executable, "-m", "benchmarks.gpu_worker_faults", "--case", case, "--device", args.device,
               "--stage", args.stage, "--model", args.model, "--dist-timeout", str(args.dist_timeout)]
    limit = 3 * args.dist_timeout + 300  # start-up (loading, graphs), the idle wait, the fault, shutdown
    started = time.monotonic()
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
        lines, ended = child.stdout.splitlines(), f"exit code {child.returncode}"
        stderr = child.stderr
    except subprocess.TimeoutExpired as expired:  # its output comes back as bytes here, even with text=True
        output = expired.stdout or b""
        lines = (output.decode() if isinstance(output, bytes) else output).splitlines()
        ended, stderr = f"still running after {limit:g} s (killed)", ""
    reports = [json.loads(line) for line in lines if line.startswith("{")]
    workers = next((r["workers"] for r in reports if "workers" in r), [])
    result = next((r for r in reports if "outcome" in r), None)
    time.sleep(1)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if result is None:
        last = [line for line in stderr.splitlines() if line.strip()][-3:]
        outcome = f"no answer: the case process ended ({ended}) after {time.monotonic() - started:.0f} s; " + " | ".join(last)
        ok = False
    else:
        expected = "served" if case == "idle" else "WorkerFailure"
        in_time = case == "idle" or result["seconds"] <= args.dist_timeout + MARGIN_S
        ok = result["outcome"].startswith(expected) and in_time and not left
        outcome = f"{result['outcome'][:160]} (after {result['seconds']} s)"
    print(f"{'ok  ' if ok else 'FAIL'} {case}: {outcome}" + (f"; workers left running: {left}" if left else ""), flush=True)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stage", default="stage07_tp")
    parser.add_argument("--model", help="a checkpoint folder (default: a random Qwen3-0.6B)")
    parser.add_argument("--dist-timeout", type=float, default=10.0)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # set in the child process that runs one case
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.device, args.stage, args.model, args.dist_timeout)), flush=True)
        return
    if args.model is None:
        from benchmarks.checkpoints import random_checkpoint

        args.model = str(random_checkpoint("qwen3-0.6b", device=args.device))
    import torch

    backend = "NCCL" if args.device == "cuda" else "gloo"
    where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if args.device == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, {backend}: {args.stage}, tp_size=2, dist_timeout={args.dist_timeout:g} s")
    failures = sum(not check(case, args) for case in args.cases.split(","))
    print(f"failures: {failures}")


if __name__ == "__main__":
    main()
