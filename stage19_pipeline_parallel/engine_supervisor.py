"""Keeps one engine process serving: start it, read its updates, start it again after it dies.

The front end (``tokenizer_manager.py``) sends requests through a supervisor
and is called back on its event loop: ``on_updates`` with every batch of
updates the engine sends, ``on_exit`` when the engine's pipe closes (the
process was killed or crashed; its requests in flight are lost), and
``on_restart`` once a new engine process is ready. In between, a thread
starts new processes, waiting longer after each one that fails to start,
while the server keeps answering (``/health`` says 503 meanwhile).

Stage 16: one supervisor per data-parallel replica
(``data_parallel_controller.py``), each with the replica's index and its
share of the CPU's threads.
"""

import asyncio
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable

from .engine_handle import EngineHandle
from .engine_process import AbortRequest, EngineReady, UpdateBatch

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # waits before each try to start a dead engine again


def log(message: str) -> None:
    """The server's log is its stderr, shared with the engine process (whose tracebacks land there too)."""
    print(f"[server] {message}", file=sys.stderr, flush=True)


class EngineSupervisor:
    """One engine process, kept running: ``send`` reaches whichever process serves now."""

    def __init__(self, engine_kwargs: dict, max_queued_requests: int | None,
                 on_updates: Callable[[UpdateBatch], None], on_exit: Callable[[], None], on_restart: Callable[[], None],
                 index: int = 0, cpu_threads: int | None = None):
        self.index, self.cpu_threads = index, cpu_threads
        self.engine_kwargs, self.max_queued_requests = engine_kwargs, max_queued_requests  # kept for restarts
        self.on_updates, self.on_exit, self.on_restart = on_updates, on_exit, on_restart
        self.name = f"engine replica {index}"  # in the log
        self.engine = self._start_engine()
        self.alive = True
        self.restarts = 0  # engine processes started again after one died
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def wait_ready(self) -> EngineReady:
        """Wait until the first engine process is ready; stop it and raise if it could not start."""
        try:
            return self.engine.wait_ready()
        except BaseException:
            self.engine.stop()
            raise

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin reading updates; the callbacks run on ``loop`` (the server's event loop)."""
        self.loop = loop
        self._start_reader(self.engine)

    def send(self, message) -> None:
        self.engine.send(message)

    def update_engine_kwargs(self, **changes) -> None:
        """Settings for engine processes started from now on (stage 15: the adapters served now)."""
        self.engine_kwargs = dict(self.engine_kwargs, **changes)

    def abort(self, rid: str) -> None:
        """Stop a request whose caller went away (a dead engine has nothing to stop)."""
        if self.alive:
            self.send(AbortRequest(rid))

    def stop(self) -> None:
        """Stop the engine process (it releases its engine and workers), or kill it if it hangs."""
        self.stopping = True  # a restart in progress gives up
        self.engine.stop()

    # ----- the reader thread, and bringing a dead engine back ---------------------------

    def _start_engine(self) -> EngineHandle:
        return EngineHandle(self.engine_kwargs, self.max_queued_requests, self.index, self.cpu_threads)

    def _start_reader(self, engine: EngineHandle) -> None:
        threading.Thread(target=self._read_updates, args=(engine,), name="engine-reader", daemon=True).start()

    def _read_updates(self, engine: EngineHandle) -> None:
        try:
            while True:
                batch: UpdateBatch = engine.conn.recv()
                self.loop.call_soon_threadsafe(self.on_updates, batch)
        except (EOFError, OSError):  # the engine process ended
            self.loop.call_soon_threadsafe(self._exited)

    def _exited(self) -> None:
        """The engine's pipe closed: its requests are lost; start a new engine (unless the server is stopping)."""
        self.alive = False
        if self.stopping:
            return
        self.on_exit()
        threading.Thread(target=self._restart, name="engine-restart", daemon=True).start()

    def _restart(self) -> None:
        """Start engine processes, waiting longer after each failure, until one is ready."""
        old = self.engine.process
        old.join(timeout=5)
        log(f"{self.name} exited ({exit_reason(old.exitcode)}); starting a new one")
        for attempt in itertools.count():
            time.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            if self.stopping:
                return
            if old.is_alive():
                old.kill()  # its pipe closed but it lingers: make room for the new one
                old.join()
            engine = self._start_engine()
            try:
                engine.wait_ready()
            except ValueError as error:
                log(f"restarting {self.name} failed (try {attempt + 1}): {error}")
                continue
            if self.stopping:  # the server began to stop while this engine started
                engine.stop()
                return
            self.loop.call_soon_threadsafe(self._back, engine)
            return

    def _back(self, engine: EngineHandle) -> None:
        self.engine = engine
        self.restarts += 1
        log(f"{self.name} is serving again (pid {engine.process.pid}, restart {self.restarts})")
        self.alive = True
        self._start_reader(engine)
        self.on_restart()


def exit_reason(code: int | None) -> str:
    """A process's exit code in words: ``killed by SIGKILL`` for -9."""
    if code is None:
        return "still running, its pipe closed"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
