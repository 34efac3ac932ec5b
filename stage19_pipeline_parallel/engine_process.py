"""The engine loop in a process of its own, and the messages it trades with the front end.

A server has two kinds of work: the GPU loop (schedule, launch, read tokens)
and everything around HTTP (parse JSON, tokenize, build responses, stream
events to slow clients). In one process they would take turns, and the GPU
would idle while a response is written. So, as SGLang does, the engine runs in
its own process (SGLang's "scheduler process") and the HTTP front end in
another; one duplex pipe joins them:

    front end (tokenizer_manager.py)                    engine process (this file)
      GenerateRequest(rid, prompt ids, params)  ──▶       Engine.add_request
      AbortRequest(rid)                         ──▶       Engine.abort_request
      ProfileRequest(rid, start, ...)           ──▶       its step profiler (step_profiler.py)
      LoRAAdapterRequest(rid, name, path)       ──▶       Engine.load_lora_adapter / unload_lora_adapter
                                                ◀──       UpdateBatch: new text per request,
                                                          outputs of finished ones, engine stats

The loop drains the pipe between steps, so new requests join the very next
step; when nothing runs it sleeps on the pipe. Each loop sends at most one
message back, whatever the number of requests. The engine process still
turns tokens into text (stop strings are checked on text, as in SGLang's
scheduler); with the overlap schedule that work hides behind the GPU's next
step.
"""

import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput
from .step_profiler import StepProfiler

SHUTDOWN = "shutdown"  # the front end's last message: leave the loop and release the engine
HEARTBEAT_PERIOD_S = 0.5  # stage 16: how often a replica's heartbeat counts up
IDLE_STATS_S = 1.0  # stage 18: an idle engine sends its counts this often


@dataclass
class GenerateRequest:
    """Front end -> engine: start one request. ``rid`` is the front end's id for it."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    lora_path: str | None = None  # stage 15: the adapter it runs with (None: the base model)
    bootstrap: dict | None = None  # stage 18: its prefill engine and room (bootstrap_host, _port, _room)
    stream_ids: bool = False  # a /generate stream: send the token ids with its updates


@dataclass
class LoRAAdapterRequest:
    """Front end -> engine: serve one more adapter (``path`` given) or stop serving one (``path`` None).
    Answered with one RequestUpdate: empty if done, else the error."""

    rid: str
    name: str
    path: str | None = None


@dataclass
class AbortRequest:
    """Front end -> engine: stop a request (its client went away); its pages are freed."""

    rid: str


@dataclass
class ProfileRequest:
    """Front end -> engine: start profiling its steps (``start``) or stop and write the trace.
    Answered with one RequestUpdate: the trace's path as ``text`` on stop, else the error."""

    rid: str
    start: bool
    output_dir: str | None = None
    num_steps: int | None = None


@dataclass
class RequestUpdate:
    """Engine -> front end: what one request did since its last update.

    The first update of every request says whether it was accepted: an empty
    one if so, else ``error`` with the HTTP status the front end should send.
    """

    rid: str
    text: str = ""  # new text, safe to stream (no partial stop string)
    # With return_logprob: (token id, logprob, alternatives) of the tokens generated since the last update,
    # and once, with logprob_start_len, the same for the prompt's tokens from there on.
    logprobs: list[tuple[int, float, list]] | None = None
    prompt_logprobs: list[tuple[int, float | None, list | None]] | None = None
    token_ids: list[int] | None = None  # with stream_ids: the ids generated since the last update
    output: GenerateOutput | None = None  # set once, in the update where the request finished
    error: str | None = None
    status: int = 200  # for an error: 400 (the request is invalid), 503 (the queue is full) or 500 (its step failed)


@dataclass
class UpdateBatch:
    """Engine -> front end: every update of one loop, and the engine's counts (``Engine.stats``)."""

    updates: list[RequestUpdate]
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class EngineReady:
    """Engine -> front end, once at start-up: the engine is built (or why it could not be)."""

    model_folder: str | None = None  # where the front end loads the same tokenizer from
    context_length: int = 0
    error: str | None = None
    lora_adapters: dict[str, str] = field(default_factory=dict)  # the adapters served at start-up: name -> folder


class EngineLoop:
    """Serve requests from the pipe until the front end says SHUTDOWN."""

    def __init__(self, engine: Engine, conn: Connection, max_queued_requests: int | None):
        self.engine = engine
        self.conn = conn
        self.max_queued_requests = max_queued_requests
        self.live: dict[str, int] = {}  # front-end id -> engine id, for requests not finished yet
        self.front_id: dict[int, str] = {}  # the reverse map
        self.logprobs_sent: dict[str, int] = {}  # requests that stream log-probabilities: tokens sent so far
        self.ids_sent: dict[str, int] = {}  # ... that stream token ids (/generate): ids sent so far
        self.prompt_scores_due: dict[str, list[int]] = {}  # ... and the prompt tokens whose scores are not sent yet
        self.profiler = StepProfiler()

    def run(self) -> None:
        while True:
            if not self.live:  # idle: sleep until the front end sends something, and send the
                self.conn.poll(IDLE_STATS_S)  # counts now and then (stage 18: handovers end in the background)
            updates = []
            while self.conn.poll():
                message = self.conn.recv()
                if message == SHUTDOWN:
                    return
                updates += self.handle(message)
            if self.live:
                updates += self.step()
            self.conn.send(UpdateBatch(updates, self.engine.stats()))

    def handle(self, message) -> list[RequestUpdate]:
        if isinstance(message, AbortRequest):
            if message.rid in self.live:
                self.engine.abort_request(self.live[message.rid])  # reported as finished at the next step
            return []
        if isinstance(message, ProfileRequest):
            return [self.profile(message)]
        rid = message.rid
        if isinstance(message, LoRAAdapterRequest):
            try:
                if message.path is None:
                    self.engine.unload_lora_adapter(message.name)
                else:
                    self.engine.load_lora_adapter(message.name, message.path)
            except ValueError as error:
                return [RequestUpdate(rid, error=str(error), status=400)]
            return [RequestUpdate(rid)]
        waiting = self.engine.stats()["waiting"]
        if self.max_queued_requests is not None and waiting >= self.max_queued_requests:
            return [RequestUpdate(rid, error=f"the queue is full ({waiting} requests wait; "
                                  "--max-queued-requests); retry later", status=503)]
        try:
            engine_id = self.engine.add_request(message.prompt_ids, message.params, lora_path=message.lora_path,
                                                **(message.bootstrap or {}))
        except ValueError as error:
            return [RequestUpdate(rid, error=str(error), status=400)]
        self.live[rid], self.front_id[engine_id] = engine_id, rid
        if message.params.return_logprob:
            self.logprobs_sent[rid] = 0
        if message.stream_ids:
            self.ids_sent[rid] = 0
        if message.params.logprob_start_len >= 0:
            self.prompt_scores_due[rid] = message.prompt_ids[message.params.logprob_start_len :]
        return [RequestUpdate(rid)]

    def profile(self, message: ProfileRequest) -> RequestUpdate:
        try:
            if message.start:
                self.profiler.start(message.output_dir, message.num_steps)
                return RequestUpdate(message.rid)
            return RequestUpdate(message.rid, text=self.profiler.stop())
        except (ValueError, OSError) as error:
            return RequestUpdate(message.rid, error=str(error), status=400)

    def step(self) -> list[RequestUpdate]:
        """One engine step; then an update for every request with new text or a finish."""
        pieces = self.engine.step()
        self.profiler.stepped()
        updates = {self.front_id[eid]: RequestUpdate(self.front_id[eid], text=piece) for eid, piece in pieces.items()}
        for rid, engine_id in list(self.live.items()):
            output = self.engine.get_output(engine_id)
            if rid in self.prompt_scores_due:
                self.send_prompt_logprobs(rid, engine_id, output, updates)
            if rid in self.logprobs_sent:
                self.send_logprobs(rid, engine_id, output, updates)
            if rid in self.ids_sent:
                self.send_ids(rid, engine_id, output, updates)
            if output is not None:
                update = updates.setdefault(rid, RequestUpdate(rid))
                update.output = output
                if output.error is not None:  # a failed step stopped it (out of memory): its caller learns why
                    update.error, update.status = output.error, 500
                del self.live[rid], self.front_id[engine_id]
                self.logprobs_sent.pop(rid, None)
                self.ids_sent.pop(rid, None)
                self.prompt_scores_due.pop(rid, None)
        return list(updates.values())

    def send_prompt_logprobs(self, rid: str, engine_id: int, output: GenerateOutput | None, updates: dict) -> None:
        """Attach the prompt's log-probabilities, once the prefill has computed them all."""
        if output is None:
            scores = self.engine.prompt_logprobs(engine_id)
        else:
            scores = list(zip(output.input_token_logprobs or [], output.input_top_logprobs or []))
        if scores is not None:
            tokens = self.prompt_scores_due.pop(rid)
            updates.setdefault(rid, RequestUpdate(rid)).prompt_logprobs = [(t, *s) for t, s in zip(tokens, scores)]

    def send_logprobs(self, rid: str, engine_id: int, output: GenerateOutput | None, updates: dict) -> None:
        """Attach the log-probabilities of the tokens generated since the request's last update."""
        sent = self.logprobs_sent[rid]
        if output is None:
            new = self.engine.token_logprobs(engine_id, sent)
        else:
            new = list(zip(output.token_ids, output.output_token_logprobs, output.output_top_logprobs))[sent:]
        if new:
            updates.setdefault(rid, RequestUpdate(rid)).logprobs = new
            self.logprobs_sent[rid] = sent + len(new)

    def send_ids(self, rid: str, engine_id: int, output: GenerateOutput | None, updates: dict) -> None:
        """Attach the ids of the tokens generated since the request's last update."""
        sent = self.ids_sent[rid]
        new = self.engine.output_ids(engine_id, sent) if output is None else list(output.token_ids[sent:])
        if new:
            updates.setdefault(rid, RequestUpdate(rid)).token_ids = new
            self.ids_sent[rid] = sent + len(new)


def beat(heartbeat, period_s: float = HEARTBEAT_PERIOD_S) -> None:
    """Count up ``heartbeat`` (shared with the front end) while this process runs. A thread of its own,
    so a long step or a large message is not silence; a process that is stopped or frozen stops it."""
    while True:
        heartbeat.value += 1
        time.sleep(period_s)


def run_engine_process(conn: Connection, engine_kwargs: dict, max_queued_requests: int | None,
                       cpu_threads: int | None = None, heartbeat=None) -> None:
    """The engine process's main: build the engine, say it is ready, serve until SHUTDOWN.
    Stage 16: ``cpu_threads`` is this replica's share of the CPU's cores (replicas on the CPU);
    ``heartbeat`` a shared counter that a thread here keeps counting, so the front end tells a busy
    replica from a hung one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the front end stops us
    if heartbeat is not None:
        threading.Thread(target=beat, args=(heartbeat,), name="heartbeat", daemon=True).start()
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    try:
        engine = Engine(**engine_kwargs)
    except Exception as error:  # noqa: BLE001 - a bad model path or flag: the front end reports it and exits
        conn.send(EngineReady(error=f"{type(error).__name__}: {error}"))
        return
    try:
        conn.send(EngineReady(str(engine.runner.model_folder), engine.context_length, lora_adapters=engine.lora_paths))
        EngineLoop(engine, conn, max_queued_requests).run()
    except (EOFError, BrokenPipeError):
        pass  # the front end is gone: nobody is left to serve
    except Exception:
        traceback.print_exc()  # the front end sees the pipe close and fails the requests in flight
        raise
    finally:
        engine.shutdown()
