"""The front end's handle on the engine processes: start them, route requests, route updates back.

SGLang calls this part the TokenizerManager: it lives in the HTTP process,
turns text into token ids before a request crosses to an engine, and hands
each HTTP handler the updates of its own requests. Handlers are coroutines
on one asyncio loop; a reader thread per engine process blocks on its pipe
and passes every update batch to that loop, which puts each update on its
request's queue.

Stage 16: ``dp_size`` engine processes (data-parallel replicas), each a
whole engine with its own KV pool and prefix cache. The router
(``router.py``) picks the replica of every request. A replica that dies, or
sends nothing for ``dist_timeout`` seconds while it has work, is taken out
of routing (and killed): its requests that have not produced anything yet
go to another replica, the others end with an error.
"""

import asyncio
import multiprocessing as mp
import threading
import time
import uuid
from collections.abc import AsyncIterator

import torch

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
from .router import Router

WATCHDOG_PERIOD_S = 1.0  # how often the front end checks that busy replicas still answer


class EngineError(Exception):
    """A request the engine refused or could not finish; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Replica:
    """One engine process and the pipe to it."""

    def __init__(self, index: int, context, engine_kwargs: dict, max_queued_requests: int | None,
                 cpu_threads: int | None = None):
        self.index, self.alive, self.last_heard = index, True, time.monotonic()
        self.busy_since = self.last_heard  # when it last got work while idle: its silence counts from then
        self.conn, child_conn = context.Pipe()
        # Not a daemon: with tp/ep the engine process starts worker processes of its own.
        self.process = context.Process(target=run_engine_process,
                                       args=(child_conn, engine_kwargs, max_queued_requests, cpu_threads),
                                       name=f"engine-{index}")
        self.process.start()
        child_conn.close()

    def wait_ready(self) -> EngineReady:
        while not self.conn.poll(0.5):
            if not self.process.is_alive():
                raise ValueError(f"engine process {self.index} exited during start-up (exit code {self.process.exitcode})")
        ready = self.conn.recv()
        if ready.error is not None:
            self.process.join()
            raise ValueError(f"the engine could not start: {ready.error}")
        return ready

    def send(self, message) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            pass  # it died: its reader thread reports that

    def stop(self) -> None:
        if self.process.is_alive():
            self.send(SHUTDOWN)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def replica_gpus(engine_kwargs: dict, replica: int) -> list[int]:
    """The GPUs of ``replica``'s ranks on this node, each ``gpu_id_step`` apart, after those of the
    replicas before it (SGLang's placement; a step of 0 puts every replica on ``base_gpu_id``)."""
    ranks = max(engine_kwargs.get("tp_size", 1), engine_kwargs.get("ep_size", 1)) // engine_kwargs.get("nnodes", 1)
    step = engine_kwargs.get("gpu_id_step", 1)
    first = engine_kwargs.get("base_gpu_id", 0) + replica * ranks * step
    return [first + rank * step for rank in range(ranks)]


class TokenizerManager:
    """Starts the engine processes and serves as their client inside the HTTP process."""

    def __init__(self, engine_kwargs: dict, max_queued_requests: int | None = None, dp_size: int = 1,
                 load_balance_method: str = "cache_aware"):
        self.router = Router(dp_size, load_balance_method)
        self.hang_timeout = engine_kwargs.get("dist_timeout", 30.0)
        context = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
        # On the CPU, replicas share its cores: each gets its part (torch would give each all of them).
        cpu_threads = max(1, torch.get_num_threads() // dp_size) if dp_size > 1 else None
        self.replicas = [Replica(r, context, dict(engine_kwargs, base_gpu_id=replica_gpus(engine_kwargs, r)[0]),
                                 max_queued_requests, cpu_threads) for r in range(dp_size)]
        try:
            ready = [replica.wait_ready() for replica in self.replicas]
        except BaseException:
            self.shutdown()
            raise
        self.model_folder = ready[0].model_folder
        self.tokenizer = Tokenizer(ready[0].model_folder)
        self.context_length = ready[0].context_length
        self.lora_adapters = dict(ready[0].lora_adapters)  # stage 15: adapters served now, name -> folder
        self.metrics = ServerMetrics(dp_size)
        self.queues: dict[str, tuple[asyncio.Queue, int]] = {}  # rid -> (its group's queue, its index)
        self.owner: dict[str, int] = {}  # rid -> the replica serving it, until it finishes
        self.sent: dict[str, GenerateRequest] = {}  # rid -> the request, while nothing of it reached its caller
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def engine_alive(self) -> bool:
        return any(r.alive for r in self.replicas)

    def replicas_down(self) -> list[int]:
        return [r.index for r in self.replicas if not r.alive]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin routing updates to coroutines on ``loop`` (the server's event loop)."""
        self.loop = loop
        for replica in self.replicas:
            threading.Thread(target=self._read_updates, args=(replica,), name=f"engine-reader-{replica.index}",
                             daemon=True).start()
        threading.Thread(target=self._watch, name="replica-watchdog", daemon=True).start()

    def shutdown(self) -> None:
        """Stop the engine processes (they release their engines and workers), or kill those that hang."""
        for replica in self.replicas:
            replica.stop()

    # ----- requests ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []  # the engine refuses an empty prompt

    def token_text(self, token_id: int) -> str:
        """One token's text, as log-probability entries name it."""
        return self.tokenizer.decode([token_id])

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, tools))

    async def update_lora_adapter(self, name: str, path: str | None) -> None:
        """Load (``path`` given) or unload an adapter in every replica; ``EngineError`` if one refuses."""
        if not self.engine_alive:
            raise EngineError(503, "no engine process is running")
        queue, rids = asyncio.Queue(), []
        for replica in self.replicas:
            if replica.alive:
                rid = uuid.uuid4().hex
                self.queues[rid] = (queue, replica.index)
                rids.append(rid)
                replica.send(LoRAAdapterRequest(rid, name, path))
        try:
            updates = [(await queue.get())[1] for _ in rids]
        finally:
            for rid in rids:
                del self.queues[rid]
        error = next((u for u in updates if u.error is not None), None)
        if error is not None:
            raise EngineError(error.status, error.error)
        if path is None:
            self.lora_adapters.pop(name, None)
        else:
            self.lora_adapters[name] = path

    async def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], lora_path: str | None = None
    ) -> AsyncIterator[tuple[int, RequestUpdate]]:
        """Run a group of requests (an HTTP request's choices); yield ``(index, update)`` as they come.

        Nothing is yielded until the engines have accepted every request of the
        group; if one refuses, ``EngineError`` is raised before any output,
        so a handler can still answer with an error status. Requests still
        running when the caller stops iterating (a client that went away)
        are aborted and their pages freed.
        """
        if not self.engine_alive:
            raise EngineError(503, "no engine process is running")
        queue: asyncio.Queue = asyncio.Queue()
        rids = [uuid.uuid4().hex for _ in prompts]
        for index, rid in enumerate(rids):
            self.queues[rid] = (queue, index)
        unfinished = set(rids)
        try:
            for rid, prompt_ids, p in zip(rids, prompts, params):
                self._send(GenerateRequest(rid, prompt_ids, p, lora_path))
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
                self.sent.pop(rid, None)
                if rid in unfinished and rid in self.owner:
                    self.replicas[self.owner[rid]].send(AbortRequest(rid))
                    self._finished(rid)

    def _send(self, request: GenerateRequest) -> None:
        """Route a request to a replica and send it there."""
        replica = self.router.choose(request.prompt_ids)
        self.owner[request.rid], self.sent[request.rid] = replica, request
        self.metrics.replica_requests.labels(str(replica)).inc()
        if self.router.load[replica] == 1:  # it was idle: quiet until now was no hang
            self.replicas[replica].busy_since = time.monotonic()
        self.replicas[replica].send(request)

    def _finished(self, rid: str) -> None:
        if rid in self.owner:
            self.router.finished(self.owner.pop(rid))
        self.sent.pop(rid, None)

    # ----- the reader threads and the watchdog ------------------------------------------

    def _read_updates(self, replica: Replica) -> None:
        try:
            while True:
                batch: UpdateBatch = replica.conn.recv()
                replica.last_heard = time.monotonic()
                self.loop.call_soon_threadsafe(self._dispatch, batch, replica.index)
        except (EOFError, OSError):  # the engine process ended
            self.loop.call_soon_threadsafe(self._replica_exited, replica.index)

    def _watch(self) -> None:
        """Kill a replica that has work but has sent nothing for ``dist_timeout`` seconds (it hangs):
        its pipe then closes, and ``_replica_exited`` takes it out."""
        while any(r.alive for r in self.replicas):
            time.sleep(WATCHDOG_PERIOD_S)
            for replica in self.replicas:
                busy = self.router.load[replica.index] > 0
                silent = time.monotonic() - max(replica.last_heard, replica.busy_since)
                if replica.alive and busy and silent > self.hang_timeout:
                    replica.process.kill()

    def _dispatch(self, batch: UpdateBatch, replica: int) -> None:
        self.metrics.observe_stats(batch.stats, replica)
        for update in batch.updates:
            if update.output is not None:
                self.metrics.observe_finished(update.output)
            if update.text or update.logprobs or update.prompt_logprobs:
                self.sent.pop(update.rid, None)  # its caller has output now: it cannot be sent elsewhere
            if update.output is not None or update.error is not None:
                self._finished(update.rid)
            if update.rid in self.queues:  # else its caller has gone (an abort is on its way)
                queue, index = self.queues[update.rid]
                queue.put_nowait((index, update))

    def _replica_exited(self, index: int) -> None:
        """A replica is gone: route around it; requests it never answered go to another replica,
        the rest end with an error."""
        replica = self.replicas[index]
        replica.alive = False
        self.router.replica_down(index)
        self.metrics.replica_down(index)
        for rid in [rid for rid, owner in self.owner.items() if owner == index]:
            request = self.sent.get(rid)
            self.router.finished(self.owner.pop(rid))
            if request is not None and self.engine_alive:
                self._send(request)
                continue
            self.sent.pop(rid, None)
            if rid in self.queues:
                queue, position = self.queues[rid]
                queue.put_nowait((position, RequestUpdate(rid, error=f"engine replica {index} exited", status=500)))
