"""Stage 18: an engine that only prefills, or only decodes (``--disaggregation-mode``).

In one engine a long prompt's prefill and everyone else's decode share each
step, so a burst of prompts shows in every running request's time between
tokens. Disaggregation splits the two phases into engines of their own:

    router ──▶ prefill engine: computes the prompt's K/V and its first token,
         │                     hands both to the decode engine (kv_transfer.py)
         └──▶ decode engine:   waits for the K/V, then generates the rest

Both engines get the same request, with the same ``bootstrap_room`` (the
number that matches the two halves) and the prefill engine's bootstrap
address (``bootstrap_host``, ``bootstrap_port``). On the decode side each
handover goes through explicit states (``Handover``): waiting (for pages to
reserve), transferring (pages reserved and announced to the prefill engine,
its K/V on the way), done (running like any decoding request), or failed (no
K/V within ``--disaggregation-timeout``: the request ends with an error, and
every page it held is free).
"""

import dataclasses
import enum
import math
import queue
import time

import torch

from common.sampling import SamplingParams

from .cache_controller import pool_slots
from .kv_transfer import KVReceiver, KVSender

IDLE_WAIT_S = 0.005  # a decode engine with nothing but handovers in flight waits this long for K/V per step


class Handover(enum.Enum):
    WAITING = "waiting"  # for pages to reserve
    TRANSFERRING = "transferring"  # pages reserved, the prefill engine told; its K/V on the way
    DONE = "done"  # K/V placed: the request decodes
    FAILED = "failed"  # no K/V in time (or aborted): its pages are free again


def check_disaggregation(args) -> None:
    """Refuse what the handover does not cover yet, saying why."""
    if args.disaggregation_mode is not None and max(args.tp_size, args.ep_size) > 1:
        raise ValueError("disaggregation_mode hands over rank 0's K/V only and does not compose with tp_size or ep_size "
                         "above 1 yet")


def make_role(args, runner, scheduler):
    """The engine's part in disaggregation: PrefillRole, DecodeRole, or None (an engine of both phases)."""
    if args.disaggregation_mode == "prefill":
        return PrefillRole(runner, args.disaggregation_bootstrap_port, args.disaggregation_timeout)
    if args.disaggregation_mode == "decode":
        return DecodeRole(runner, scheduler, args.disaggregation_timeout)
    return None


class PrefillRole:
    """A prefill engine: each request with a bootstrap room stops after its first token, and its
    prompt's K/V goes to the decode engine that asks for that room."""

    waits_for_kv = False

    def __init__(self, runner, port: int, timeout_s: float):
        self.runner, self.sender = runner, KVSender(port, timeout_s)
        device = runner.pool.k.device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def check(self, params: SamplingParams, bootstrap: dict) -> SamplingParams:
        """A request to hand over generates its first token here, and the decode engine the rest."""
        return params if bootstrap["bootstrap_room"] is None else dataclasses.replace(params, max_tokens=1)

    def hand_over(self, finished: list) -> None:
        """Called before finished requests release their pages: copy their prompt's K/V off the
        pool and queue it for the decode engine.

        The gather runs in the step's stream, so it reads the pages before anything reuses them;
        on a GPU the copy to (pinned) host memory runs on a side stream, and the sending thread
        waits for it, not the engine."""
        pool, page_size = self.runner.pool, self.runner.page_size
        for request in finished:
            if request.bootstrap_room is None or not request.output_ids or request.error is not None:
                continue
            prompt = len(request.prompt_ids)
            pages = request.page_table[: math.ceil(prompt / page_size)]
            slots = pool_slots(pages, page_size, pool.k.device)
            kv, copied = torch.stack([pool.k[:, slots], pool.v[:, slots]]), None
            if self.copy_stream is not None:
                host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
                self.copy_stream.wait_stream(torch.cuda.current_stream(kv.device))
                with torch.cuda.stream(self.copy_stream):
                    host.copy_(kv, non_blocking=True)
                    kv.record_stream(self.copy_stream)  # not reused before the copy is done
                    copied = torch.cuda.Event()
                    copied.record()
                kv = host
            self.sender.send(request.bootstrap_room, request.output_ids[0], prompt, len(pages), kv, copied)

    def add(self, request) -> None:
        raise AssertionError("a prefill engine schedules every request itself")

    def stats(self) -> dict:
        """Handovers whose K/V this engine still holds (not yet asked for, or being sent)."""
        return {"prefill_inflight": self.sender.in_flight}

    def admit(self) -> None:
        pass

    def abort(self, request) -> None:
        pass

    def close(self) -> None:
        self.sender.close()


class DecodeRole:
    """A decode engine: a request reserves pages, asks its prefill engine for the K/V, then decodes."""

    waits_for_kv = True

    def __init__(self, runner, scheduler, timeout_s: float):
        self.runner, self.scheduler, self.timeout_s = runner, scheduler, timeout_s
        layers, _, heads, dim = runner.pool.k.shape
        device = runner.pool.k.device
        self.receiver = KVReceiver(layers, runner.page_size, heads, dim, runner.pool.k.dtype, timeout_s,
                                   pinned=device.type == "cuda")
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.handovers: dict[int, tuple] = {}  # room -> (request, since when), in arrival order
        self.copying: dict[int, tuple] = {}  # room -> (arrival, its K/V on the device, copy done): GPU only
        self.transfer_started: dict[int, float] = {}  # room -> when its pages were reserved and asked for
        self.done = self.failed = 0
        self.kv_bytes = self.kv_seconds = self.handover_seconds = 0.0  # payloads received; reserve-to-placed times

    def check(self, params: SamplingParams, bootstrap: dict) -> SamplingParams:
        if bootstrap["bootstrap_room"] is None:
            return params
        if None in (bootstrap["bootstrap_host"], bootstrap["bootstrap_port"]):
            raise ValueError("a request with bootstrap_room needs bootstrap_host and bootstrap_port (its prefill engine)")
        if params.return_logprob or params.logprob_start_len >= 0:
            raise ValueError("log-probabilities are not handed over from the prefill engine yet: send this request "
                             "to an engine of both phases")
        return params

    def add(self, request) -> None:
        if request.bootstrap_room in self.handovers:
            raise ValueError(f"bootstrap_room {request.bootstrap_room} is already in use")
        request.handover = Handover.WAITING
        self.handovers[request.bootstrap_room] = (request, time.monotonic())

    def admit(self) -> None:
        """Each step: reserve pages for waiting handovers (in order, while the pool allows) and ask
        their prefill engines to send; place K/V that arrived; fail handovers past the timeout."""
        runner, now = self.runner, time.monotonic()
        for request, _ in list(self.handovers.values()):
            if request.handover is Handover.WAITING:
                pages = math.ceil((len(request.prompt_ids) + 1) / runner.page_size)
                if pages > runner.available_pages() or not runner.page_tables.free_rows:
                    break  # in order: nobody overtakes the oldest
                runner.page_tables.take_row(request)
                runner.allocate_cache(request, len(request.prompt_ids))
                self.receiver.expect(request.bootstrap_host, request.bootstrap_port, request.bootstrap_room)
                request.handover = Handover.TRANSFERRING
                self.transfer_started[request.bootstrap_room] = time.monotonic()
        idle = not self.scheduler.running and not self.scheduler.waiting
        arrivals = []
        if idle and self.handovers:  # nothing else to do: wait a moment for K/V rather than spin
            try:
                arrivals.append(self.receiver.arrivals.get(timeout=IDLE_WAIT_S))
            except queue.Empty:
                pass
        while not self.receiver.arrivals.empty():
            arrivals.append(self.receiver.arrivals.get())
        for arrival in arrivals:
            if arrival.room in self.handovers:  # (else its request was aborted or failed meanwhile)
                self._copy_in(arrival)
        for room, (arrival, kv, copied) in list(self.copying.items()):
            if copied is None or copied.query():
                del self.copying[room]
                self._place(self.handovers.pop(room)[0], arrival, kv)
        for room, (request, since) in list(self.handovers.items()):
            if now - since > self.timeout_s and room not in self.copying:
                self._fail(request, f"no K/V arrived from the prefill engine within {self.timeout_s:g} s")

    def _copy_in(self, arrival) -> None:
        """Start copying arrived K/V to the device: on a GPU from pinned memory on a side stream,
        so the steps running meanwhile do not wait for it (a later step places it)."""
        if self.copy_stream is None:
            self.copying[arrival.room] = (arrival, arrival.kv, None)
            return
        with torch.cuda.stream(self.copy_stream):
            kv = arrival.kv.to(self.copy_stream.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self.copying[arrival.room] = (arrival, kv, copied)

    def _place(self, request, arrival, kv: torch.Tensor) -> None:
        """Write the K/V into the pages reserved for it (in the step's stream), and let the request decode."""
        runner = self.runner
        slots = pool_slots(request.page_table, runner.page_size, runner.pool.k.device)
        runner.pool.k[:, slots], runner.pool.v[:, slots] = kv[0], kv[1]
        request.num_cached, request.handover = arrival.prompt_tokens, Handover.DONE
        self.done += 1
        self.kv_bytes += arrival.kv.numel() * arrival.kv.element_size()
        self.kv_seconds += arrival.seconds
        self.handover_seconds += time.monotonic() - self.transfer_started.pop(arrival.room)
        request.append_token(arrival.first_token)
        if request.grammar is not None:  # the prefill engine's grammar allowed it; this one follows it too
            request.grammar.follow(request, arrival.first_token, False)
        if request.finished:
            runner.free_cache(request)
        else:
            self.scheduler.running.append(request)

    def _fail(self, request, why: str) -> None:
        del self.handovers[request.bootstrap_room]
        self.copying.pop(request.bootstrap_room, None)
        self.transfer_started.pop(request.bootstrap_room, None)
        self.failed += 1
        if request.page_table or request.table_row is not None:
            self.runner.free_cache(request)
        request.handover, request.error, request.finish_reason = Handover.FAILED, why, "abort"

    def abort(self, request) -> None:
        if request.bootstrap_room in self.handovers and self.handovers[request.bootstrap_room][0] is request:
            self._fail(request, "aborted")
            request.error = None

    def hand_over(self, finished: list) -> None:
        pass

    def stats(self) -> dict:
        """Handovers by state (SGLang's prealloc and transfer queues), and what the done ones cost."""
        states = [request.handover for request, _ in self.handovers.values()]
        return {"decode_prealloc": states.count(Handover.WAITING), "decode_transfer": states.count(Handover.TRANSFERRING),
                "handovers_done": self.done, "handovers_failed": self.failed, "kv_transfer_bytes": self.kv_bytes,
                "kv_transfer_seconds": self.kv_seconds, "handover_seconds": self.handover_seconds}

    def close(self) -> None:
        self.receiver.close()
