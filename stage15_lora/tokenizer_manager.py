"""The front end's handle on the engine process: start it, send requests, route updates back.

SGLang calls this part the TokenizerManager: it lives in the HTTP process,
turns text into token ids before a request crosses to the engine, and hands
each HTTP handler the updates of its own requests. Handlers are coroutines
on one asyncio loop; a reader thread blocks on the pipe and passes every
update batch to that loop, which puts each update on its request's queue.
"""

import asyncio
import multiprocessing as mp
import threading
import uuid
from collections.abc import AsyncIterator

from common.sampling import SamplingParams
from common.tokenizer import Tokenizer

from .engine_process import (
    SHUTDOWN,
    AbortRequest,
    EngineReady,
    GenerateRequest,
    LoRAAdapterRequest,
    RequestUpdate,
    UpdateBatch,
    run_engine_process,
)
from .metrics import ServerMetrics


class EngineError(Exception):
    """A request the engine refused or could not finish; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TokenizerManager:
    """Starts the engine process and serves as its client inside the HTTP process."""

    def __init__(self, engine_kwargs: dict, max_queued_requests: int | None = None):
        context = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
        self.conn, child_conn = context.Pipe()
        # Not a daemon: with tp/ep the engine process starts worker processes of its own.
        self.process = context.Process(
            target=run_engine_process, args=(child_conn, engine_kwargs, max_queued_requests), name="engine"
        )
        self.process.start()
        child_conn.close()
        ready = self._wait_ready()
        self.model_folder = ready.model_folder
        self.tokenizer = Tokenizer(ready.model_folder)
        self.context_length = ready.context_length
        self.lora_adapters = dict(ready.lora_adapters)  # stage 15: adapters served now, name -> folder
        self.metrics = ServerMetrics()
        self.queues: dict[str, tuple[asyncio.Queue, int]] = {}  # rid -> (its group's queue, its index)
        self.engine_alive = True
        self.loop: asyncio.AbstractEventLoop | None = None

    def _wait_ready(self) -> EngineReady:
        while not self.conn.poll(0.5):
            if not self.process.is_alive():
                raise ValueError(f"the engine process exited during start-up (exit code {self.process.exitcode})")
        ready = self.conn.recv()
        if ready.error is not None:
            self.process.join()
            raise ValueError(f"the engine could not start: {ready.error}")
        return ready

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin routing updates to coroutines on ``loop`` (the server's event loop)."""
        self.loop = loop
        threading.Thread(target=self._read_updates, name="engine-reader", daemon=True).start()

    def shutdown(self) -> None:
        """Stop the engine process (it releases its engine and workers), or kill it if it hangs."""
        if self.process.is_alive():
            try:
                self.conn.send(SHUTDOWN)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    # ----- requests ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []  # the engine refuses an empty prompt

    def token_text(self, token_id: int) -> str:
        """One token's text, as log-probability entries name it."""
        return self.tokenizer.decode([token_id])

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, tools))

    async def update_lora_adapter(self, name: str, path: str | None) -> None:
        """Load (``path`` given) or unload an adapter in the engine; ``EngineError`` if it refuses."""
        if not self.engine_alive:
            raise EngineError(503, "the engine process is not running")
        queue, rid = asyncio.Queue(), uuid.uuid4().hex
        self.queues[rid] = (queue, 0)
        try:
            self.conn.send(LoRAAdapterRequest(rid, name, path))
            _, update = await queue.get()
        finally:
            del self.queues[rid]
        if update.error is not None:
            raise EngineError(update.status, update.error)
        if path is None:
            self.lora_adapters.pop(name, None)
        else:
            self.lora_adapters[name] = path

    async def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], lora_path: str | None = None
    ) -> AsyncIterator[tuple[int, RequestUpdate]]:
        """Run a group of requests (an HTTP request's choices); yield ``(index, update)`` as they come.

        Nothing is yielded until the engine has accepted every request of the
        group; if it refuses one, ``EngineError`` is raised before any output,
        so a handler can still answer with an error status. Requests still
        running when the caller stops iterating (a client that went away)
        are aborted and their pages freed.
        """
        if not self.engine_alive:
            raise EngineError(503, "the engine process is not running")
        queue: asyncio.Queue = asyncio.Queue()
        rids = [uuid.uuid4().hex for _ in prompts]
        for index, rid in enumerate(rids):
            self.queues[rid] = (queue, index)
        unfinished = set(rids)
        try:
            for rid, prompt_ids, p in zip(rids, prompts, params):
                self.conn.send(GenerateRequest(rid, prompt_ids, p, lora_path))
            accepted, early = 0, []
            while accepted < len(rids):  # the first update of each request says whether it was accepted
                index, update = await queue.get()
                if update.error is not None:
                    unfinished.discard(update.rid)
                    raise EngineError(update.status, update.error)
                accepted += not (update.text or update.logprobs or update.prompt_logprobs or update.output)  # an acceptance
                early.append((index, update))  # the first accepted requests may already have text
            while unfinished:
                index, update = early.pop(0) if early else await queue.get()
                if update.error is not None:
                    raise EngineError(update.status, update.error)
                if update.output is not None:
                    unfinished.discard(update.rid)
                if update.text or update.logprobs or update.prompt_logprobs or update.output is not None:
                    yield index, update
        finally:
            for rid in rids:
                del self.queues[rid]
                if rid in unfinished and self.engine_alive:
                    self.conn.send(AbortRequest(rid))

    # ----- the reader thread ------------------------------------------------------------

    def _read_updates(self) -> None:
        try:
            while True:
                batch: UpdateBatch = self.conn.recv()
                self.loop.call_soon_threadsafe(self._dispatch, batch)
        except (EOFError, OSError):  # the engine process ended
            self.loop.call_soon_threadsafe(self._engine_exited)

    def _dispatch(self, batch: UpdateBatch) -> None:
        self.metrics.observe_stats(batch.stats)
        for update in batch.updates:
            if update.output is not None:
                self.metrics.observe_finished(update.output)
            if update.rid in self.queues:  # else its caller has gone (an abort is on its way)
                queue, index = self.queues[update.rid]
                queue.put_nowait((index, update))

    def _engine_exited(self) -> None:
        self.engine_alive = False
        for rid, (queue, index) in self.queues.items():
            queue.put_nowait((index, RequestUpdate(rid, error="the engine process exited", status=500)))
