"""Stage 17: moving pages between the tiers, a few large copies per move.

A prefix's pages lie scattered over the device pool. Copying them page by
page and layer by layer costs a transfer each (on an H100, 1,024 pages of
Qwen3-0.6B: 759 ms that way against 34 ms for the same bytes in one copy), so
a move is three steps:

    gather the pages on the device into one buffer, in the host's layout
    copy across: one copy per run of consecutive host pages
    scatter the buffer into the destination pages

The host pool is laid out page first (``host_kv_pool.py``) and its allocator
hands out runs of consecutive pages, so a node's pages are usually one block
of pinned memory: it crosses in one copy, with no gather on the host.

Copies run on a side stream (``copy_stream``). A write (device -> host)
gathers in the step's stream, so it reads the pages before any later kernel
reuses them, and the copy stream takes it from there while the GPU goes on
computing. A load (host -> device) copies on the copy stream without waiting
for the running step; the step's stream waits for it only where it scatters
into the pool, just before the forward that reads the pages. The copy stream
runs its copies in order, so a load of pages a write has just filled reads
them filled. The host reads the pool itself only to store pages in files,
and waits for their writes first. On the CPU every copy is immediate.
(SGLang's ``HiCacheController``.)
"""

import dataclasses
import time

import torch

from common.device_copy import copy_to_device

from .hicache_storage import HiCacheFile
from .host_kv_pool import HostKVPool
from .kv_cache import PagedKVPool


def pool_slots(pages: list[int], page_size: int, device: torch.device) -> torch.Tensor:
    """The pool slots of ``pages``, in order: page * page_size + 0 .. page_size - 1. (The page ids
    cross in a pinned copy that does not wait: ``torch.tensor(pages, device=...)`` would make the
    host wait for the running step.)"""
    (pages,) = copy_to_device([pages], device)
    return (pages[:, None] * page_size + torch.arange(page_size, device=device)).flatten()


@dataclasses.dataclass
class HiCacheStats:
    """What the tiers did, for ``Engine.stats()`` and ``/metrics``."""

    device_hit_tokens: int = 0  # admitted prompt tokens found in the device pool
    host_hit_tokens: int = 0  # ... loaded back from host memory
    disk_hit_tokens: int = 0  # ... loaded back from files
    bytes_loaded: int = 0  # host or disk -> device
    bytes_written: int = 0  # device -> host
    bytes_stored: int = 0  # host -> files
    load_seconds: float = 0.0  # host time spent issuing loads (file reads included)
    bad_files: int = 0  # files missing, short or altered when read


class HiCacheController:
    """Copies pages between the device pool, the host pool and (optionally) files."""

    def __init__(self, device_pool: PagedKVPool, host_pool: HostKVPool, storage: HiCacheFile | None):
        self.device_pool, self.host_pool, self.storage = device_pool, host_pool, storage
        self.page_size = device_pool.page_size
        self.device = device_pool.k.device
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending_writes = []  # (copy done, host pages it fills): device -> host copies maybe still running
        self.stats = HiCacheStats()

    def slots(self, pages: list[int], device: torch.device) -> torch.Tensor:
        return pool_slots(pages, self.page_size, device)

    def _pages_first(self, pages: list[int]) -> torch.Tensor:
        """Gather device pages into the host layout, on the device: ``[n, 2, layers, page_size, heads, dim]``."""
        slots = self.slots(pages, self.device)
        kv = torch.stack([self.device_pool.k[:, slots], self.device_pool.v[:, slots]])  # [2, L, n * ps, H, D]
        kv = kv.unflatten(2, (len(pages), self.page_size))  # [2, L, n, ps, H, D]
        return kv.permute(2, 0, 1, 3, 4, 5).contiguous()

    def _scatter(self, kv: torch.Tensor, pages: list[int]) -> None:
        """Put pages in the host layout (on the device) into the device pool's ``pages``."""
        slots = self.slots(pages, self.device)
        kv = kv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [2, L, n * ps, H, D]
        self.device_pool.k[:, slots], self.device_pool.v[:, slots] = kv[0], kv[1]

    @staticmethod
    def _runs(pages: list[int]):
        """``(i, first page, length)`` for each run of consecutive ids in ``pages`` (from index i)."""
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            yield i, pages[i], j - i
            i = j

    def write(self, device_pages: list[int], host_pages: list[int]) -> None:
        """Copy device pages to host pages (a write-back on eviction, or a write-through)."""
        kv = self._pages_first(device_pages)  # the gather, in the step's stream: before any reuse of the pages
        self.stats.bytes_written += kv.numel() * kv.element_size()
        host = self.host_pool.kv
        if self.copy_stream is None:
            host[host_pages] = kv
            return
        gathered = torch.cuda.Event()
        gathered.record()
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(gathered)
            for i, page, n in self._runs(host_pages):
                host[page : page + n].copy_(kv[i : i + n], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        kv.record_stream(self.copy_stream)  # made on the step's stream, read on the copy stream
        self.pending_writes = [(d, pages) for d, pages in self.pending_writes if not d.query()]
        self.pending_writes.append((done, set(host_pages)))

    def wait_for_writes(self, host_pages: list[int]) -> None:
        """Before the host reads these pages of its pool: wait for the copies still filling them."""
        wanted, still = set(host_pages), []
        for done, pages in self.pending_writes:
            if done.query():
                continue
            if pages & wanted:
                done.synchronize()
            else:
                still.append((done, pages))
        self.pending_writes = still

    def load(self, host_pages: list[int], device_pages: list[int]) -> None:
        """Copy host pages into device pages, to be read by the next forward."""
        started = time.perf_counter()
        host = self.host_pool.kv
        self.stats.bytes_loaded += len(host_pages) * host[0].numel() * host.element_size()
        if self.copy_stream is None:
            self._scatter(host[host_pages], device_pages)
        else:
            with torch.cuda.stream(self.copy_stream):  # the running step goes on meanwhile
                arrived = torch.empty((len(host_pages), *host.shape[1:]), dtype=host.dtype, device=self.device)
                for i, page, n in self._runs(host_pages):
                    arrived[i : i + n].copy_(host[page : page + n], non_blocking=True)
            self._arrive(arrived, device_pages)
        self.stats.load_seconds += time.perf_counter() - started

    def store(self, host_pages: list[int], keys: list[str]) -> None:
        """Write host pages to files, one per page, under ``keys``."""
        if self.copy_stream is not None:
            self.wait_for_writes(host_pages)
        for page, key in zip(host_pages, keys):
            self.stats.bytes_stored += self.storage.put(key, self.host_pool.kv[page])

    def read(self, keys: list[str]) -> list[torch.Tensor]:
        """Read pages from files, in order, up to the first that is missing or fails its check."""
        like = self.host_pool.kv[0]
        pages = []
        for key in keys:
            page = self.storage.get(key, like)
            if page is None:
                break
            pages.append(page)
        self.stats.bad_files = self.storage.bad_files
        return pages

    def load_read(self, pages: list[torch.Tensor], device_pages: list[int]) -> None:
        """Copy pages read from files into device pages (a file is slower than the copy)."""
        started = time.perf_counter()
        staged = torch.stack(pages)
        self.stats.bytes_loaded += staged.numel() * staged.element_size()
        if self.copy_stream is None:
            self._scatter(staged, device_pages)
        else:
            with torch.cuda.stream(self.copy_stream):
                arrived = staged.to(self.device)
            self._arrive(arrived, device_pages)
        self.stats.load_seconds += time.perf_counter() - started

    def _arrive(self, arrived: torch.Tensor, device_pages: list[int]) -> None:
        """The step's stream waits for the copy, then scatters it into the pool."""
        step_stream = torch.cuda.current_stream(self.device)
        step_stream.wait_stream(self.copy_stream)
        arrived.record_stream(step_stream)  # made on the copy stream, read on the step's
        self._scatter(arrived, device_pages)
