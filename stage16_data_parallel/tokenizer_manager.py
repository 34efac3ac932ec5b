"""The front end's handle on the engine processes: start them, route requests, route updates back.

SGLang calls this part the TokenizerManager: it lives in the HTTP process,
turns text into token ids before a request crosses to an engine, and hands
each HTTP handler the updates of its own requests. Handlers are coroutines
on one asyncio loop; a reader thread per engine process blocks on its pipe
and passes every update batch to that loop, which puts each update on its
request's queue.

Tokenizing is the front end's one heavy job, so it runs on worker threads
(``run_on_tokenizer_thread``) and is bounded: text far longer than the context could
ever hold is refused after tokenizing only a head of it. An engine process
that dies (killed, crashed) fails its requests in flight with an error and
is started again, with back-off, while the server keeps answering.

Stage 16: ``dp_size`` engine processes (data-parallel replicas), each a
whole engine with its own KV pool and prefix cache. The router
(``router.py``) picks the replica of every request. A replica that dies, or
whose heartbeat stops for ``dist_timeout`` seconds (it is frozen; a busy one
keeps beating), is taken out of routing (and killed): its requests that have
not produced anything yet go to another replica, the others end with an
error. Then it is started again, and routed to once it is ready.
"""

import asyncio
import itertools
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from common.sampling import SamplingParams
from common.tokenizer import Tokenizer

from .engine_handle import EngineHandle
from .engine_process import AbortRequest, GenerateRequest, LoRAAdapterRequest, RequestUpdate, UpdateBatch
from .metrics import ServerMetrics
from .router import Router

WATCHDOG_PERIOD_S = 1.0  # how often the front end checks that replicas' heartbeats still count
# A token of real text is a few characters; text longer than this many characters per token of context is
# refused once its first (context x this) characters alone fill the context, without tokenizing the rest.
MAX_CHARS_PER_TOKEN = 16
TOKENIZER_THREADS = 4  # requests parsed and tokenized at once (the Rust tokenizer runs without the GIL)
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # waits before each try to start a dead engine again


def log(message: str) -> None:
    """The server's log is its stderr, shared with the engine processes (whose tracebacks land there too)."""
    print(f"[server] {message}", file=sys.stderr, flush=True)


class EngineError(Exception):
    """A request the engine refused or could not finish; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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
        self.engine_kwargs, self.max_queued_requests = engine_kwargs, max_queued_requests  # kept for restarts
        # On the CPU, replicas share its cores: each gets its part (torch would give each all of them).
        self.cpu_threads = max(1, torch.get_num_threads() // dp_size) if dp_size > 1 else None
        self.replicas = [self._start_replica(r) for r in range(dp_size)]
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
        self.restarts = 0  # engine processes started again after one died
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        # Parsing and tokenizing run here: a large request's work never holds up a small one's.
        self.tokenizer_threads = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenizer")

    def _start_replica(self, index: int) -> EngineHandle:
        kwargs = dict(self.engine_kwargs, base_gpu_id=replica_gpus(self.engine_kwargs, index)[0])
        return EngineHandle(kwargs, self.max_queued_requests, index, self.cpu_threads)

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
        self.stopping = True  # restarts in progress give up
        for replica in self.replicas:
            replica.stop()

    # ----- requests ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``ValueError`` for text far too long for the context, found by
        tokenizing only its first ``context x MAX_CHARS_PER_TOKEN`` characters."""
        if not text:
            return []  # the engine refuses an empty prompt
        cap = self.context_length * MAX_CHARS_PER_TOKEN
        if len(text) > cap:
            head = len(self.tokenizer.encode(text[:cap]))
            counted = f"over {head:,} tokens (its first {cap:,} characters)" if head >= self.context_length else \
                f"{len(text):,} characters, more than the {cap:,} this server tokenizes for a context of that size"
            raise ValueError(f"the prompt has {counted}, but the model's context is {self.context_length} "
                             "tokens; shorten it")
        return self.tokenizer.encode(text)

    async def run_on_tokenizer_thread(self, function, *args):
        """Run tokenizer work off the event loop, so other requests and /health are answered meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_threads, function, *args)

    def token_text(self, token_id: int) -> str:
        """One token's text, as log-probability entries name it."""
        return self.tokenizer.decode([token_id])

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> tuple[str, list[int]]:
        """The conversation rendered by the chat template, as text and as (bounded) token ids."""
        text = self.tokenizer.apply_chat_template(messages, tools, template_kwargs)
        return text, self.encode(text)

    async def update_lora_adapter(self, name: str, path: str | None) -> None:
        """Load (``path`` given) or unload an adapter in every replica; ``EngineError`` if one refuses."""
        if not self.engine_alive:
            raise EngineError(503, "no engine process is running (they are being restarted); retry later")
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
            raise EngineError(503, "no engine process is running (they are being restarted); retry later")
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
        self.replicas[replica].send(request)

    def _finished(self, rid: str) -> None:
        if rid in self.owner:
            self.router.finished(self.owner.pop(rid))
        self.sent.pop(rid, None)

    # ----- the reader threads, the watchdog, and bringing dead replicas back --------------

    def _read_updates(self, replica: EngineHandle) -> None:
        try:
            while True:
                batch: UpdateBatch = replica.conn.recv()
                self.loop.call_soon_threadsafe(self._dispatch, batch, replica.index)
        except (EOFError, OSError):  # the engine process ended
            self.loop.call_soon_threadsafe(self._replica_exited, replica.index)

    def _watch(self) -> None:
        """Kill a replica whose heartbeat has not counted for ``dist_timeout`` seconds (it is frozen):
        its pipe then closes, and ``_replica_exited`` takes it out."""
        while not self.stopping:
            time.sleep(WATCHDOG_PERIOD_S)
            for replica in self.replicas:
                beat, now = replica.heartbeat.value, time.monotonic()
                if beat != replica.last_beat:
                    replica.last_beat, replica.last_beat_time = beat, now
                elif replica.alive and now - replica.last_beat_time > self.hang_timeout:
                    log(f"engine replica {replica.index}'s heartbeat stopped {now - replica.last_beat_time:.0f} s "
                        "ago (--dist-timeout); killing it")
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
        if not self.stopping:
            threading.Thread(target=self._restart, args=(index,), name=f"engine-restart-{index}", daemon=True).start()
        for rid in [rid for rid, owner in self.owner.items() if owner == index]:
            request = self.sent.get(rid)
            self.router.finished(self.owner.pop(rid))
            if request is not None and self.engine_alive:
                self._send(request)
                continue
            self.sent.pop(rid, None)
            if rid in self.queues:
                queue, position = self.queues[rid]
                queue.put_nowait((position, RequestUpdate(rid, error=f"engine replica {index} exited while serving "
                                                          "this request; it is being restarted, retry", status=500)))

    def _restart(self, index: int) -> None:
        """Start replica ``index`` again, waiting longer after each failure, until it is ready."""
        old = self.replicas[index].process
        old.join(timeout=5)
        log(f"engine replica {index} exited ({exit_reason(old.exitcode)}); starting a new one")
        for attempt in itertools.count():
            time.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            if self.stopping:
                return
            if old.is_alive():
                old.kill()  # its pipe closed but it lingers: make room for the new one
                old.join()
            if self.lora_adapters or self.engine_kwargs.get("lora_paths"):  # the adapters served now
                self.engine_kwargs = dict(self.engine_kwargs, lora_paths=dict(self.lora_adapters))
            replica = self._start_replica(index)
            try:
                replica.wait_ready()
            except ValueError as error:
                log(f"restarting engine replica {index} failed (try {attempt + 1}): {error}")
                continue
            if self.stopping:  # the server began to stop while this replica started
                replica.stop()
                return
            self.loop.call_soon_threadsafe(self._replica_back, replica)
            return

    def _replica_back(self, replica: EngineHandle) -> None:
        self.restarts += 1
        log(f"engine replica {replica.index} is serving again (pid {replica.process.pid}, restart {self.restarts})")
        self.replicas[replica.index] = replica
        self.metrics.engine_restarted(replica.index)
        self.router.replica_up(replica.index)
        threading.Thread(target=self._read_updates, args=(replica,), name=f"engine-reader-{replica.index}",
                         daemon=True).start()


def exit_reason(code: int | None) -> str:
    """A process's exit code in words: ``killed by SIGKILL`` for -9."""
    if code is None:
        return "still running, its pipe closed"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
