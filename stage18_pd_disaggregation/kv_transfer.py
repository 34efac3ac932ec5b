"""Stage 18: handing a prompt's K/V from a prefill engine to a decode engine.

A prefill engine listens on its bootstrap port (``--disaggregation-bootstrap-port``,
SGLang's): a ``torch.distributed.TCPStore`` where decode engines introduce
themselves. Each decode engine that does gets a process group of two ranks
with that prefill engine (prefill rank 0, decode rank 1), built on the store
under a prefix of its own, so any number of decode engines can come and go
without a world of fixed size. Gloo, on the CPU.

A request carries ``bootstrap_host`` / ``bootstrap_port`` (its prefill engine)
and ``bootstrap_room`` (the number that matches its two halves). The protocol:

    decode:  reserves pages for the prompt, then writes room/<room> = <its peer id>
             into the prefill engine's store: "send it to me, I have room"
    prefill: computes the prompt and its first token, waits for room/<room>, and
             sends two messages on that pair's group:
                 header   [room, pages, first token, prompt tokens]   (int64)
                 payload  the prompt's keys and values: [2, layers, pages * page_size, heads, dim]
    decode:  places the K/V in the pages it reserved and decodes on

Gloo completes a receive only inside ``wait()``, so each pair's receiving end
is a thread that waits for header, then payload, and hands them to the engine
through a queue; each pair's sending end is a thread too, so a slow or hung
decode engine delays only its own handovers. An engine's step never blocks on
a transfer.
"""

import datetime
import queue
import threading
import time

import torch
import torch.distributed as dist

HEADER_TAG, PAYLOAD_TAG = 0, 1
# A gloo wait that times out closes the pair for good, so the pair groups are built with no
# practical timeout (an idle pair waits for its next header as long as it takes) and each
# transfer's own waits are bounded by the handover timeout instead.
IDLE = datetime.timedelta(days=7)


class Arrival:
    """A prompt's K/V, received: which request (room), its first token, the keys and values, and
    how long the payload took to come (seconds, from its header)."""

    def __init__(self, room: int, first_token: int, prompt_tokens: int, kv: torch.Tensor, seconds: float):
        self.room, self.first_token, self.prompt_tokens, self.kv = room, first_token, prompt_tokens, kv
        self.seconds = seconds


class KVSender:
    """The prefill side: hosts the bootstrap store, and sends each handover once its decode engine asks."""

    def __init__(self, port: int, timeout_s: float):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=self.timeout)
        self.groups: dict[int, object] = {}  # decode engine (peer id) -> its pair group
        self.peer_queues: dict[int, queue.Queue] = {}  # decode engine -> handovers it asked for, sent in order
        self.outbox: queue.Queue = queue.Queue()
        self.in_flight = 0  # handovers queued and not yet sent or dropped (their K/V held here)
        self._count = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="kv-accept"),
                         threading.Thread(target=self._dispatch, daemon=True, name="kv-dispatch")]
        for thread in self._threads:
            thread.start()

    def _accept(self) -> None:
        """Build a pair group, and a thread that sends on it, with each decode engine that introduces itself."""
        seen = 0
        while not self._stop.is_set():
            peers = self.store.add("peers", 0)
            for peer in range(seen + 1, peers + 1):
                self.peer_queues[peer] = queue.Queue()
                self.groups[peer] = dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{peer}", self.store), 0, 2, IDLE)
                thread = threading.Thread(target=self._send_to, args=(peer,), daemon=True, name=f"kv-send-{peer}")
                self._threads.append(thread)
                thread.start()
            seen = peers
            time.sleep(0.01)

    def send(self, room: int, first_token: int, prompt_tokens: int, num_pages: int, kv: torch.Tensor,
             copied: torch.cuda.Event | None = None) -> None:
        """Queue a handover (``kv`` already copied off the pool: the engine may reuse its pages; on a
        GPU the copy may still be under way, until ``copied``)."""
        self._counted(+1)
        self.outbox.put((room, first_token, prompt_tokens, num_pages, kv, copied))

    def _counted(self, change: int) -> None:
        with self._count:
            self.in_flight += change

    def _dispatch(self) -> None:
        """Pass each queued handover to its decode engine's thread once that engine has asked for it
        (written ``room/<room>``); drop one that nobody asks for within the timeout."""
        pending, closing = [], False  # (deadline, handover)
        while not closing:  # closing drops what nobody has asked for yet (its decode engine will time out)
            try:
                item = self.outbox.get(timeout=0.005 if pending else None)
                if item is None:
                    closing = True
                else:
                    pending.append((time.monotonic() + self.timeout.total_seconds(), item))
            except queue.Empty:
                pass
            still = []
            for deadline, item in pending:
                room = item[0]
                if self.store.check([f"room/{room}"]) and (peer := int(self.store.get(f"room/{room}"))) in self.groups:
                    self.store.delete_key(f"room/{room}")
                    self.peer_queues[peer].put(item)
                elif time.monotonic() > deadline:
                    self._counted(-1)  # nobody asked: its decode engine has given the request up (or never had it)
                else:
                    still.append((deadline, item))
            pending = still
        self._counted(-len(pending))

    def _send_to(self, peer: int) -> None:
        """Send one decode engine's handovers, one after another, on its pair group. If it has gone
        away, what it asked for is dropped (its requests ended there) and it is asked nothing more."""
        group, handovers = self.groups[peer], self.peer_queues[peer]
        while (item := handovers.get()) is not None:
            room, first_token, prompt_tokens, num_pages, kv, copied = item
            if peer in self.groups:
                try:
                    if copied is not None:
                        copied.synchronize()
                    header = torch.tensor([room, num_pages, first_token, prompt_tokens], dtype=torch.int64)
                    group.send([header], 1, HEADER_TAG).wait(self.timeout)
                    group.send([kv.contiguous()], 1, PAYLOAD_TAG).wait(self.timeout)
                except RuntimeError:  # gone, or hung past the timeout (the wait closed the pair)
                    del self.groups[peer]
            del item, kv  # the K/V copy is not held past its send
            self._counted(-1)

    def close(self) -> None:
        """Stop: handovers already asked for are sent first (each within the timeout); the rest are dropped."""
        self.outbox.put(None)
        self._threads[1].join(timeout=self.timeout.total_seconds())
        self._stop.set()
        self._threads[0].join(timeout=5)
        for handovers in self.peer_queues.values():
            handovers.put(None)
        for thread in self._threads[2:]:
            thread.join(timeout=self.timeout.total_seconds())
        for group in list(self.groups.values()):
            group.abort()


class KVReceiver:
    """The decode side: per prefill engine it takes requests from, a pair group and two threads,
    one that tells it which rooms to send and one that receives. The engine's step only queues:
    a prefill engine that is slow to answer, hung or gone delays only its own handovers."""

    def __init__(self, layers: int, page_size: int, heads: int, dim: int, dtype: torch.dtype, timeout_s: float,
                 pinned: bool = False):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.shape, self.page_size, self.dtype = (layers, heads, dim), page_size, dtype
        self.pinned = pinned  # receive into pinned memory, which a GPU copies from without the host waiting
        self.peers: dict[tuple[str, int], queue.Queue] = {}  # prefill engine -> rooms to announce to it
        self.groups: dict[tuple[str, int], object] = {}  # prefill engine -> the pair group, once built
        self.arrivals: queue.Queue[Arrival] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._announcers = []  # one thread per prefill engine (the receiving threads are not kept: see close)

    def expect(self, host: str, port: int, room: int) -> None:
        """Tell a prefill engine that this engine has reserved pages for ``room``: it may send."""
        with self._lock:
            if (host, port) not in self.peers:
                self.peers[host, port] = queue.Queue()
                self._announcers.append(self._start(self._announce, (host, port), self.peers[host, port]))
            self.peers[host, port].put(room)

    def _start(self, target, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"kv-{target.__name__}-{args[0]}")
        thread.start()
        return thread

    def _announce(self, address: tuple[str, int], rooms: queue.Queue) -> None:
        """Introduce this engine to a prefill engine's store (a pair group with it, a receiving
        thread), then write ``room/<room>`` there for each room reserved."""
        try:
            store = dist.TCPStore(*address, is_master=False, timeout=self.timeout)
            peer = store.add("peers", 1)
            group = dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{peer}", store), 1, 2, IDLE)
            self.groups[address] = group
            self._start(self._receive, address, group)
            while (room := rooms.get()) is not None and not self._stop.is_set():
                store.set(f"room/{room}", str(peer))
        except RuntimeError:  # unreachable or gone (DistStoreError is one): its requests time out
            self._forget(address)

    def _forget(self, address: tuple[str, int]) -> None:
        """A prefill engine that failed: a later request to it connects afresh."""
        with self._lock:
            if (rooms := self.peers.pop(address, None)) is not None:
                rooms.put(None)

    def _receive(self, address: tuple[str, int], group) -> None:
        layers, heads, dim = self.shape
        while not self._stop.is_set():
            header = torch.empty(4, dtype=torch.int64)
            try:
                group.recv([header], 0, HEADER_TAG).wait()  # idle until the next handover
                room, pages, first_token, prompt_tokens = header.tolist()
                kv = torch.empty((2, layers, pages * self.page_size, heads, dim), dtype=self.dtype, pin_memory=self.pinned)
                start = time.perf_counter()
                group.recv([kv], 0, PAYLOAD_TAG).wait(self.timeout)
            except RuntimeError:  # the prefill engine went away (or this one is closing): its requests time out
                self._forget(address)
                return
            self.arrivals.put(Arrival(room, first_token, prompt_tokens, kv, time.perf_counter() - start))

    def close(self) -> None:
        """Stop receiving: the announcing threads end, the pair groups are aborted. A receiving
        thread idle in ``recv`` is not waited for: gloo's abort does not interrupt a posted recv,
        so that daemon thread ends when its prefill engine closes the pair (or with the process)."""
        self._stop.set()
        for address in list(self.peers):
            self._forget(address)
        for group in list(self.groups.values()):
            group.abort()
        for thread in self._announcers:
            thread.join(timeout=5)
