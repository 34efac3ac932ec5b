"""The front end's client of the engine process: send it requests, route its updates back.

SGLang calls this part the TokenizerManager: it lives in the HTTP process,
turns text into token ids before a request crosses to the engine, and hands
each HTTP handler the updates of its own requests. Handlers are coroutines
on one asyncio loop; the engine's supervisor (``engine_supervisor.py``)
reads the engine's pipe on a thread and passes every update batch to that
loop, where ``_dispatch`` puts each update on its request's queue.

Tokenizing is the front end's one heavy job, so it runs on worker threads
(``run_on_tokenizer_thread``) and is bounded: text far longer than the context could
ever hold is refused after tokenizing only a head of it. An engine process
that dies (killed, crashed) fails its requests in flight with an error; the
supervisor starts it again while the server keeps answering.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from common.sampling import SamplingParams
from common.tokenizer import Tokenizer, import_in_background

from .engine_process import GenerateRequest, LoRAAdapterRequest, ProfileRequest, RequestUpdate, UpdateBatch
from .engine_supervisor import EngineSupervisor, log
from .metrics import ServerMetrics

# A token of real text is a few characters; text longer than this many characters per token of context is
# refused once its first (context x this) characters alone fill the context, without tokenizing the rest.
MAX_CHARS_PER_TOKEN = 16
TOKENIZER_THREADS = 4  # requests parsed and tokenized at once (the Rust tokenizer runs without the GIL)


class EngineError(Exception):
    """A request the engine refused or could not finish; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TokenizerManager:
    """Starts the engine process and serves as its client inside the HTTP process."""

    def __init__(self, engine_kwargs: dict, max_queued_requests: int | None = None):
        self.metrics = ServerMetrics()
        self.queues: dict[str, tuple[asyncio.Queue, int]] = {}  # rid -> (its group's queue, its index)
        self.engines = EngineSupervisor(engine_kwargs, max_queued_requests, on_updates=self._dispatch,
                                        on_exit=self._engine_exited, on_restart=self.metrics.engine_restarted)
        importing = import_in_background()  # while the engine process builds its engine
        ready = self.engines.wait_ready()
        importing.join()
        self.model_folder = ready.model_folder
        self.tokenizer = Tokenizer(ready.model_folder)
        self.context_length = ready.context_length
        self.lora_adapters = dict(ready.lora_adapters)  # stage 15: adapters served now, name -> folder
        # Parsing and tokenizing run here: a large request's work never holds up a small one's.
        self.tokenizer_threads = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenizer")

    @property
    def engine_alive(self) -> bool:
        return self.engines.alive

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin routing updates to coroutines on ``loop`` (the server's event loop)."""
        self.engines.start(loop)

    def shutdown(self) -> None:
        """Stop the engine process (it releases its engine and workers), or kill it if it hangs."""
        self.engines.stop()

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
        """Load (``path`` given) or unload an adapter in the engine; ``EngineError`` if it refuses."""
        await self.call_engine(LoRAAdapterRequest(uuid.uuid4().hex, name, path))
        if path is None:
            self.lora_adapters.pop(name, None)
        else:
            self.lora_adapters[name] = path
        self.engines.update_engine_kwargs(lora_paths=dict(self.lora_adapters))  # what a restarted engine loads

    async def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], lora_path: str | None = None,
        stream_ids: bool = False,
    ) -> AsyncIterator[tuple[int, RequestUpdate]]:
        """Run a group of requests (an HTTP request's choices); yield ``(index, update)`` as they come.

        Nothing is yielded until the engine has accepted every request of the
        group; if it refuses one, ``EngineError`` is raised before any output,
        so a handler can still answer with an error status. Requests still
        running when the caller stops iterating (a client that went away)
        are aborted and their pages freed.
        """
        if not self.engine_alive:
            raise EngineError(503, "the engine process is not running (it is being restarted); retry later")
        queue: asyncio.Queue = asyncio.Queue()
        rids = [uuid.uuid4().hex for _ in prompts]
        for index, rid in enumerate(rids):
            self.queues[rid] = (queue, index)
        unfinished = set(rids)
        try:
            for rid, prompt_ids, p in zip(rids, prompts, params):
                self.engines.send(GenerateRequest(rid, prompt_ids, p, lora_path, stream_ids=stream_ids))
            accepted, early = 0, []
            while accepted < len(rids):  # the first update of each request says whether it was accepted
                index, update = await queue.get()
                if update.error is not None:
                    unfinished.discard(update.rid)
                    raise EngineError(update.status, update.error)
                accepted += not (update.text or update.token_ids or update.logprobs or update.prompt_logprobs
                                 or update.output)  # an acceptance
                early.append((index, update))  # the first accepted requests may already have text
            while unfinished:
                index, update = early.pop(0) if early else await queue.get()
                if update.error is not None:
                    raise EngineError(update.status, update.error)
                if update.output is not None:
                    unfinished.discard(update.rid)
                if (update.text or update.token_ids or update.logprobs or update.prompt_logprobs
                        or update.output is not None):
                    yield index, update
        finally:
            for rid in rids:
                del self.queues[rid]
                if rid in unfinished:
                    self.engines.abort(rid)

    # ----- what the engine sends (called on the event loop by the supervisor) ---------

    async def call_engine(self, message) -> RequestUpdate:
        """Send the engine one message that is not a generation and await its one answer;
        ``EngineError`` if the engine refuses it."""
        if not self.engine_alive:
            raise EngineError(503, "the engine process is not running (it is being restarted); retry later")
        queue = asyncio.Queue()
        self.queues[message.rid] = (queue, 0)
        try:
            self.engines.send(message)
            _, update = await queue.get()
        finally:
            del self.queues[message.rid]
        if update.error is not None:
            raise EngineError(update.status, update.error)
        return update

    async def profile(self, start: bool, output_dir: str | None = None, num_steps: int | None = None) -> str | None:
        """Start profiling the engine's steps, or stop and return the trace's path (``step_profiler.py``)."""
        update = await self.call_engine(ProfileRequest(uuid.uuid4().hex, start, output_dir, num_steps))
        return update.text

    def _dispatch(self, batch: UpdateBatch) -> None:
        self.metrics.observe_stats(batch.stats)
        for update in batch.updates:
            if update.output is not None:
                self.metrics.observe_finished(update.output)
            if update.rid in self.queues:  # else its caller has gone (an abort is on its way)
                queue, index = self.queues[update.rid]
                queue.put_nowait((index, update))

    def _engine_exited(self) -> None:
        """The engine's pipe closed: fail its requests in flight (the supervisor starts a new engine)."""
        log(f"the engine process's pipe closed; {len(self.queues)} requests in flight failed")
        for rid in self.queues:
            self.fail(rid, "the engine process exited while serving this request; it is being restarted, retry")

    def fail(self, rid: str, message: str) -> None:
        """End a request with an error (500) its caller sees (if it is still waiting)."""
        if rid in self.queues:
            queue, index = self.queues[rid]
            queue.put_nowait((index, RequestUpdate(rid, error=message, status=500)))
