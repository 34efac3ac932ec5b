"""The front end's handle on one engine process: start it, wait until it is ready, send it messages, stop it.

The engine runs in a process of its own (``engine_process.py``), reached
through a pipe. The front end (``tokenizer_manager.py``) holds one handle,
and a new one when it starts the engine again after it died. Stage 16: one
handle per data-parallel replica, each with a heartbeat the engine process
counts up while it lives (a frozen one stops counting). Messages go
through a sender thread, so the front end's event loop never waits on a
full pipe while the engine is busy with a step.
"""

import threading
from queue import SimpleQueue

from common.processes import process_context

from .engine_process import SHUTDOWN, EngineReady, run_engine_process


class EngineHandle:
    """One engine process and the pipe to it."""

    def __init__(self, engine_kwargs: dict, max_queued_requests: int | None, index: int = 0,
                 cpu_threads: int | None = None):
        context = process_context()  # a clean process: no CUDA state or threads inherited
        self.index = index
        self.heartbeat = context.Value("Q", 0, lock=False)  # counted up by a thread in the engine process
        self.conn, child_conn = context.Pipe()
        # Not a daemon: with tp/ep the engine process starts worker processes of its own.
        self.process = context.Process(target=run_engine_process,
                                       args=(child_conn, engine_kwargs, max_queued_requests, cpu_threads, self.heartbeat),
                                       name=f"engine-{index}")
        self.process.start()
        child_conn.close()
        self.outbox: SimpleQueue = SimpleQueue()
        threading.Thread(target=self._send_messages, name=f"engine-sender-{index}", daemon=True).start()

    def wait_ready(self) -> EngineReady:
        """Wait for the engine's first message; ``ValueError`` if it could not start."""
        while not self.conn.poll(0.5):
            if not self.process.is_alive():
                raise ValueError(f"engine process {self.index} exited during start-up (exit code {self.process.exitcode})")
        ready = self.conn.recv()
        if ready.error is not None:
            self.process.join()
            raise ValueError(f"the engine could not start: {ready.error}")
        return ready

    def send(self, message) -> None:
        """Queue a message for the engine process (the sender thread writes it)."""
        self.outbox.put(message)

    def _send_messages(self) -> None:
        while True:
            message = self.outbox.get()
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):
                return  # the engine died: the front end's reader thread sees its pipe close

    def stop(self) -> None:
        """Ask the engine process to stop (it releases its engine and workers); kill it if it hangs."""
        if self.process.is_alive():
            self.send(SHUTDOWN)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
