"""Faults planted in a parallel worker, for the tests (and benchmarks.gpu_worker_faults) of how a group fails.

A worker (ranks 1..) is a spawned process: it builds its model runner with the
factory that the engine hands its ``WorkerGroup``, pickled across. So a test
plants a fault by wrapping that factory: ``faulty_worker_group`` replaces a
stage's ``WorkerGroup`` with one whose rank ``rank`` fails at start-up, or
raises or hangs at its ``step``-th forward. (The child imports this module
by name: a spawned process gets its parent's ``sys.path``, tests/ included.)
The stages' code knows nothing of it.
"""

import importlib
import time

FAULTS = ("start", "raise", "hang")


class FaultyRunnerFactory:
    """Builds the runners as ``make_runner`` does, but rank ``rank``'s fails as ``fault`` says."""

    def __init__(self, make_runner, rank: int, fault: str, step: int = 0):
        if fault not in FAULTS:
            raise ValueError(f"fault={fault!r} is not one of {FAULTS}")
        self.make_runner, self.rank, self.fault, self.step = make_runner, rank, fault, step

    def __call__(self, tp_rank: int):
        if tp_rank == self.rank and self.fault == "start":
            raise RuntimeError(f"rank {tp_rank} was told to fail at start-up")
        runner = self.make_runner(tp_rank=tp_rank)
        if tp_rank == self.rank:
            runner.forward = FailingForward(runner.forward, tp_rank, self.fault, self.step)
        return runner


class FailingForward:
    """A runner's forward that raises (or sleeps for good) on its ``step``-th call."""

    def __init__(self, forward, rank: int, fault: str, step: int):
        self.forward, self.rank, self.fault, self.step, self.calls = forward, rank, fault, step, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            if self.fault == "hang":
                time.sleep(10**6)
            raise RuntimeError(f"rank {self.rank} was told to fail at step {self.calls}")
        return self.forward(*args, **kwargs)


def faulty_worker_group(stage: str, rank: int, fault: str, step: int = 0):
    """A stand-in for ``stage``'s ``WorkerGroup`` (set it as ``STAGE.engine.WorkerGroup``) whose
    workers come from a ``FaultyRunnerFactory``."""
    real = importlib.import_module(f"{stage}.engine").WorkerGroup

    def group(world, device, make_runner, **kwargs):
        return real(world, device, FaultyRunnerFactory(make_runner, rank, fault, step), **kwargs)

    return group
