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
through a queue; sending is a thread too. An engine's step never blocks on a
transfer.
"""

import datetime
import queue
import threading
import time

import torch
import torch.distributed as dist

HEADER_TAG, PAYLOAD_TAG = 0, 1


class Arrival:
    """A prompt's K/V, received: which request (room), its first token, and the keys and values."""

    def __init__(self, room: int, first_token: int, prompt_tokens: int, kv: torch.Tensor):
        self.room, self.first_token, self.prompt_tokens, self.kv = room, first_token, prompt_tokens, kv


class KVSender:
    """The prefill side: hosts the bootstrap store, and sends each handover once its decode engine asks."""

    def __init__(self, port: int, timeout_s: float):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=self.timeout)
        self.groups: dict[int, object] = {}  # decode engine (peer id) -> its pair group
        self.outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="kv-accept"),
                         threading.Thread(target=self._send, daemon=True, name="kv-send")]
        for thread in self._threads:
            thread.start()

    def _accept(self) -> None:
        """Build a pair group with each decode engine that introduces itself."""
        seen = 0
        while not self._stop.is_set():
            peers = self.store.add("peers", 0)
            for peer in range(seen + 1, peers + 1):
                self.groups[peer] = dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{peer}", self.store), 0, 2, self.timeout)
            seen = peers
            time.sleep(0.01)

    def send(self, room: int, first_token: int, prompt_tokens: int, num_pages: int, kv: torch.Tensor) -> None:
        """Queue a handover (``kv`` already copied off the pool: the engine may reuse its pages)."""
        self.outbox.put((room, first_token, prompt_tokens, num_pages, kv))

    def _send(self) -> None:
        """Send each queued handover once its decode engine has asked for it; one that nobody asks
        for within the timeout is dropped. Handovers never wait behind one another."""
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
                if self.store.check([f"room/{room}"]) and int(self.store.get(f"room/{room}")) in self.groups:
                    self._send_one(*item)
                elif time.monotonic() > deadline:
                    continue  # nobody asked: its decode engine has given the request up (or never had it)
                else:
                    still.append((deadline, item))
            pending = still

    def _send_one(self, room: int, first_token: int, prompt_tokens: int, num_pages: int, kv: torch.Tensor) -> None:
        try:
            group = self.groups[int(self.store.get(f"room/{room}"))]
            header = torch.tensor([room, num_pages, first_token, prompt_tokens], dtype=torch.int64)
            group.send([header], 1, HEADER_TAG).wait()
            group.send([kv.contiguous()], 1, PAYLOAD_TAG).wait()
            self.store.delete_key(f"room/{room}")
        except RuntimeError:  # the decode engine went away: its requests end there, after its timeout
            pass

    def close(self) -> None:
        """Stop: handovers already asked for are sent first; the rest are dropped."""
        self.outbox.put(None)
        self._threads[1].join(timeout=self.timeout.total_seconds())
        self._stop.set()
        self._threads[0].join(timeout=5)
        for group in self.groups.values():
            group.abort()


class KVReceiver:
    """The decode side: one pair group per prefill engine it takes requests from, each with a
    receiving thread."""

    def __init__(self, layers: int, page_size: int, heads: int, dim: int, dtype: torch.dtype, timeout_s: float):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.shape, self.page_size, self.dtype = (layers, heads, dim), page_size, dtype
        self.peers: dict[tuple[str, int], tuple] = {}  # prefill engine -> (its store, our peer id there, group)
        self.arrivals: queue.Queue[Arrival] = queue.Queue()
        self._stop = threading.Event()
        self._threads = []

    def expect(self, host: str, port: int, room: int) -> None:
        """Tell a prefill engine that this engine has reserved pages for ``room``: it may send."""
        if (host, port) not in self.peers:
            store = dist.TCPStore(host, port, is_master=False, timeout=self.timeout)
            peer = store.add("peers", 1)
            group = dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{peer}", store), 1, 2, self.timeout)
            self.peers[host, port] = (store, peer, group)
            thread = threading.Thread(target=self._receive, args=((host, port), group), daemon=True,
                                      name=f"kv-recv-{host}:{port}")
            self._threads.append(thread)
            thread.start()
        store, peer, _ = self.peers[host, port]
        store.set(f"room/{room}", str(peer))

    def _receive(self, address: tuple[str, int], group) -> None:
        layers, heads, dim = self.shape
        while not self._stop.is_set():
            header = torch.empty(4, dtype=torch.int64)
            try:
                group.recv([header], 0, HEADER_TAG).wait()
                room, pages, first_token, prompt_tokens = header.tolist()
                kv = torch.empty((2, layers, pages * self.page_size, heads, dim), dtype=self.dtype)
                group.recv([kv], 0, PAYLOAD_TAG).wait()
            except RuntimeError:  # the prefill engine went away (or this one is closing): its requests time out
                self.peers.pop(address, None)  # a later request to it connects afresh
                return
            self.arrivals.put(Arrival(room, first_token, prompt_tokens, kv))

    def close(self) -> None:
        """Stop receiving: the pair groups are aborted, which ends their threads' waits."""
        self._stop.set()
        for _, _, group in self.peers.values():
            group.abort()
        for thread in self._threads:
            thread.join(timeout=5)
