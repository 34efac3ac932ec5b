"""Data parallelism: ``dp_size`` engine replicas behind one front end (SGLang's DataParallelController).

Each replica is a whole engine (its own KV pool and prefix cache, its own
GPUs: ``replica_gpus``) in a process of its own, kept running by an
``EngineSupervisor`` as stage 11's single engine is. The controller stands
between them and the front end and offers it what one supervisor offers
(``send``, ``abort``, ``alive``, ``start``, ``stop``), so
``tokenizer_manager.py`` hardly changes. What it adds:

* **Routing.** Each generate request goes to the replica the router
  (``router.py``) picks, and its abort follows it there. An adapter load or
  unload goes to every replica; the front end gets one answer, once all
  have replied (the first error, if any).
* **A frozen replica is found.** Each engine process counts a heartbeat up
  on a thread of its own; a replica whose count has not moved for
  ``dist_timeout`` seconds is killed (a busy one keeps beating).
* **A dead replica is routed around.** Its requests that have not produced
  anything yet go to another replica (their callers never notice); the
  others end with an error. Its supervisor starts it again, and the router
  sends it requests once it is ready.
"""

import asyncio
import functools
import threading
import time
from collections.abc import Callable

import torch

from .engine_process import EngineReady, GenerateRequest, RequestUpdate, UpdateBatch
from .engine_supervisor import EngineSupervisor, log
from .replica_metrics import ReplicaMetrics
from .router import Router

WATCHDOG_PERIOD_S = 1.0  # how often the heartbeats are checked


def replica_gpus(engine_kwargs: dict, replica: int) -> list[int]:
    """The GPUs of ``replica``'s ranks on this node, each ``gpu_id_step`` apart, after those of the
    replicas before it (SGLang's placement; a step of 0 puts every replica on ``base_gpu_id``)."""
    ranks = max(engine_kwargs.get("tp_size", 1), engine_kwargs.get("ep_size", 1)) // engine_kwargs.get("nnodes", 1)
    step = engine_kwargs.get("gpu_id_step", 1)
    first = engine_kwargs.get("base_gpu_id", 0) + replica * ranks * step
    return [first + rank * step for rank in range(ranks)]


class DataParallelController:
    """``dp_size`` supervised engine replicas; ``on_updates(batch, replica)`` and ``fail(rid, message)``
    are the front end's (called on its event loop)."""

    def __init__(self, engine_kwargs: dict, max_queued_requests: int | None, dp_size: int, load_balance_method: str,
                 metrics: ReplicaMetrics, on_updates: Callable[[UpdateBatch, int], None],
                 fail: Callable[[str, str], None]):
        self.router = Router(dp_size, load_balance_method)
        self.metrics, self.on_updates, self.fail = metrics, on_updates, fail
        self.hang_timeout = engine_kwargs.get("dist_timeout", 30.0)
        self.owner: dict[str, int] = {}  # rid -> the replica serving it, until it finishes
        self.sent: dict[str, GenerateRequest] = {}  # rid -> the request, while nothing of it reached its caller
        self.broadcasts: dict[str, tuple[set[int], RequestUpdate | None]] = {}  # rid -> (replicas yet to answer, an error)
        self.stopping = False
        self.beats = {r: (0, time.monotonic()) for r in range(dp_size)}  # replica -> (count last seen, when it moved)
        # On the CPU, replicas share its cores: each gets its part (torch would give each all of them).
        cpu_threads = max(1, torch.get_num_threads() // dp_size) if dp_size > 1 else None
        self.replicas = [
            EngineSupervisor(dict(engine_kwargs, base_gpu_id=replica_gpus(engine_kwargs, r)[0]), max_queued_requests,
                             on_updates=functools.partial(self._updates, r), on_exit=functools.partial(self._exited, r),
                             on_restart=functools.partial(self._back, r), index=r, cpu_threads=cpu_threads)
            for r in range(dp_size)
        ]

    def wait_ready(self) -> EngineReady:
        """Wait until every replica is ready (they start at once); stop them all if one cannot start."""
        try:
            ready = [replica.wait_ready() for replica in self.replicas]
        except BaseException:
            self.stop()
            raise
        return ready[0]

    @property
    def alive(self) -> bool:
        return any(replica.alive for replica in self.replicas)

    def down(self) -> list[int]:
        """The replicas that are down (being started again)."""
        return [replica.index for replica in self.replicas if not replica.alive]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for replica in self.replicas:
            replica.start(loop)
        threading.Thread(target=self._watch, name="replica-watchdog", daemon=True).start()

    def stop(self) -> None:
        self.stopping = True
        for replica in self.replicas:
            replica.stop()

    def update_engine_kwargs(self, **changes) -> None:
        for replica in self.replicas:
            replica.update_engine_kwargs(**changes)

    # ----- requests in -----------------------------------------------------------------

    def send(self, message) -> None:
        """A generate request to the replica the router picks; anything else (an adapter load, a profile) to all."""
        if isinstance(message, GenerateRequest):
            replica = self.router.choose(message.prompt_ids)
            self.owner[message.rid], self.sent[message.rid] = replica, message
            self.metrics.replica_requests.labels(str(replica)).inc()
            self.replicas[replica].send(message)
            return
        live = [replica for replica in self.replicas if replica.alive]
        self.broadcasts[message.rid] = ({replica.index for replica in live}, None)
        for replica in live:
            replica.send(message)

    def abort(self, rid: str) -> None:
        if rid in self.owner:
            self.replicas[self.owner[rid]].abort(rid)
            self._finished(rid)

    def _finished(self, rid: str) -> None:
        if rid in self.owner:
            self.router.finished(self.owner.pop(rid))
        self.sent.pop(rid, None)

    # ----- updates out (on the event loop) ---------------------------------------------

    def _updates(self, replica: int, batch: UpdateBatch) -> None:
        kept = []
        for update in batch.updates:
            if update.rid in self.broadcasts:
                kept.extend(self._answered(update.rid, replica, update))
                continue
            if update.text or update.logprobs or update.prompt_logprobs:
                self.sent.pop(update.rid, None)  # its caller has output now: it cannot be sent elsewhere
            if update.output is not None or update.error is not None:
                self._finished(update.rid)
            kept.append(update)
        self.on_updates(UpdateBatch(kept, batch.stats), replica)

    def _answered(self, rid: str, replica: int, update: RequestUpdate | None) -> list[RequestUpdate]:
        """One replica's answer to a message sent to all (``None``: it died first); the front end's
        one answer once every replica has given its own."""
        waiting, error = self.broadcasts[rid]
        waiting.discard(replica)
        if update is None or update.error is not None:
            error = error or update or RequestUpdate(rid, error=f"engine replica {replica} exited", status=500)
        self.broadcasts[rid] = (waiting, error)
        if waiting:
            return []
        del self.broadcasts[rid]
        return [error or update]

    def _exited(self, index: int) -> None:
        """Replica ``index`` is gone (its supervisor starts it again): route around it; requests it
        never answered go to another replica, the rest end with an error."""
        self.router.replica_down(index)
        self.metrics.replica_down(index)
        moved = failed = 0
        for rid in [rid for rid, owner in self.owner.items() if owner == index]:
            request = self.sent.get(rid)
            self._finished(rid)
            if request is not None and self.alive:
                self.send(request)
                moved += 1
            else:
                self.fail(rid, f"engine replica {index} exited while serving this request; it is being restarted, retry")
                failed += 1
        for rid in [rid for rid, (waiting, _) in self.broadcasts.items() if index in waiting]:
            self.on_updates(UpdateBatch(self._answered(rid, index, None)), index)
        log(f"engine replica {index}'s pipe closed; {moved} requests sent to other replicas, {failed} failed")

    def _back(self, index: int) -> None:
        self.beats[index] = (0, time.monotonic())  # a new engine process: its count starts again
        self.metrics.engine_restarted(index)
        self.router.replica_up(index)

    def _watch(self) -> None:
        """Kill a replica whose heartbeat has not counted for ``dist_timeout`` seconds (it is frozen):
        its pipe then closes, and its supervisor reports it gone and starts it again."""
        while not self.stopping:
            time.sleep(WATCHDOG_PERIOD_S)
            for replica in self.replicas:
                beat, now = replica.engine.heartbeat.value, time.monotonic()
                last, since = self.beats[replica.index]
                if beat != last:
                    self.beats[replica.index] = (beat, now)
                elif replica.alive and now - since > self.hang_timeout:
                    log(f"engine replica {replica.index}'s heartbeat stopped {now - since:.0f} s ago (--dist-timeout); "
                        "killing it")
                    replica.engine.process.kill()
