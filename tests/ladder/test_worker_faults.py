"""A parallel worker that dies, hangs or raises mid-serve: a clear error, in bounded time, no process left.

Rank 0 is the engine's own process; ranks 1.. are spawned workers that run
every step with it (gloo on the CPU here). Without a bound, rank 0 would wait
in a collective for a rank that never comes, for gloo's default 30 minutes.
"""

import contextlib
import importlib
import os
import signal
import time

import pytest

from conftest import STAGES, stage_engine_class, stage_has
from worker_faults import faulty_worker_group

PARALLEL_STAGES = [s for s in STAGES if stage_has(s, "tp_size")]
PROMPT = [5, 17, 300, 42, 9]
GREEDY = dict(max_tokens=6, temperature=0, ignore_eos=True)


def start(stage, checkpoints, kind="dense", **kwargs):
    kwargs.setdefault("tp_size", 2)
    return stage_engine_class(stage)(model_path=str(checkpoints[kind]), device="cpu", **kwargs)


@contextlib.contextmanager
def parallel_engine(stage, checkpoints, **kwargs):
    """A parallel engine, shut down afterwards whatever happened; then no worker may be left."""
    engine = start(stage, checkpoints, **kwargs)
    processes = engine.workers.processes
    try:
        yield engine
    finally:
        engine.shutdown()  # a hung worker never reads a stop message: it is killed
    for process in processes:
        assert not process.is_alive(), f"worker {process.pid} outlived shutdown()"


def assert_fails_for_good(engine, match) -> BaseException:
    """The next call raises WorkerFailure matching ``match``, and so does the one after;
    returns what rank 0 saw first (the failure's cause)."""
    failure = importlib.import_module(f"{type(engine).__module__.split('.')[0]}.parallel").WorkerFailure
    with pytest.raises(failure, match=match) as first:
        engine.generate(PROMPT, **GREEDY)
    with pytest.raises(failure, match=match):  # the engine stays failed; nothing waits again
        engine.generate(PROMPT, **GREEDY)
    return first.value.__cause__


# The worker group (parallel.py) is what notices a dead rank; from stage 09 on it is the same file,
# byte for byte, so the full suite kills a worker where it changed and in the newest stage.
@pytest.mark.where_changed("parallel.py")
@pytest.mark.parametrize("stage", PARALLEL_STAGES)
def test_a_killed_worker_fails_the_next_step_at_once(stage, checkpoints):
    with parallel_engine(stage, checkpoints, dist_timeout=60) as engine:
        engine.generate(PROMPT, **GREEDY)
        worker = engine.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        cause = assert_fails_for_good(engine, r"rank 1 died mid-serve \(exit code -9\)")
        assert "timed out" not in str(cause).lower(), "the dead rank should be noticed at once, not by a timeout"


def test_a_worker_raising_in_a_step_is_quoted(checkpoints, monkeypatch):
    monkeypatch.setattr("stage07_tp.engine.WorkerGroup", faulty_worker_group("stage07_tp", 1, "raise", 3))
    with parallel_engine("stage07_tp", checkpoints, dist_timeout=60) as engine:
        cause = assert_fails_for_good(engine, r"(?s)rank 1 raised during a step.*told to fail at step 3")
        assert "timed out" not in str(cause).lower(), "the worker's error should end the step at once"


def test_a_hung_worker_fails_the_step_after_dist_timeout(checkpoints, monkeypatch):
    monkeypatch.setattr("stage07_tp.engine.WorkerGroup", faulty_worker_group("stage07_tp", 1, "hang", 3))
    with parallel_engine("stage07_tp", checkpoints, dist_timeout=3) as engine:
        cause = assert_fails_for_good(engine, r"did not answer within dist_timeout=3 s")
        assert "timed out waiting 3000ms" in str(cause).lower(), "the process group's 3 s timeout should end the wait"


def test_an_expert_parallel_worker_failure_is_caught_too(checkpoints, monkeypatch):
    monkeypatch.setattr("stage08_ep.engine.WorkerGroup", faulty_worker_group("stage08_ep", 1, "raise", 2))
    with parallel_engine("stage08_ep", checkpoints, kind="moe", tp_size=1, ep_size=2, dist_timeout=60) as engine:
        assert_fails_for_good(engine, r"(?s)rank 1 raised during a step.*told to fail at step 2")


def test_idle_workers_wait_longer_than_dist_timeout(checkpoints):
    """The timeout bounds a step, not the wait for the next one: an engine may sit idle for days."""
    with start("stage07_tp", checkpoints, dist_timeout=2) as engine:
        first = engine.generate(PROMPT, **GREEDY).token_ids
        time.sleep(5)
        assert engine.generate(PROMPT, **GREEDY).token_ids == first


@pytest.mark.parametrize("stage", ["stage07_tp", "stage10_overlap"])  # a step read at once, and one read a step later
def test_rank_0_out_of_memory_ends_the_group_at_once(stage, checkpoints, monkeypatch):
    """Without parallelism a step that runs out of memory is dropped and the engine serves on.
    With it, the other ranks already wait inside that step's collectives: the next step's
    collectives would pair with theirs. So the group ends at once, saying why."""
    from test_out_of_memory import LONG, little_memory

    with parallel_engine(stage, checkpoints, dist_timeout=60) as engine:
        model = engine.runner.model
        monkeypatch.setattr(model, "forward", little_memory(engine, model.forward))
        engine.generate(PROMPT, **GREEDY)  # a short prompt fits
        failure = importlib.import_module(f"{stage}.parallel").WorkerFailure
        for _ in range(2):  # the engine stays failed
            with pytest.raises(failure, match=r"(?s)rank 0's step failed.*out of memory"):
                engine.generate(LONG, **GREEDY)
