"""Stage 17: moving pages between the tiers, each move one gathered copy.

A prefix's pages lie scattered over the pool. Copying them page by page
costs a transfer each (on an H100, 1,024 pages of 32 KiB: 7.7 ms page by page
against 0.65 ms in one copy), so every move here is three steps:

    gather the pages into one contiguous buffer   (on the side they live on)
    one copy across                              (device <-> pinned host memory)
    scatter the buffer into the destination pages

``write`` (device -> host) gathers on the device in the step's own stream, so
it reads the pages before any later kernel can overwrite them, and starts a
non-blocking copy to pinned memory; the host pool receives it later
(``settle_writes``), when the copy has landed. ``load`` (host -> device)
gathers on the host, copies on a side stream that does not wait for the
running step (the transfer touches only its own buffer), and the step's
stream waits for that copy only where it scatters into the pool, just before
the forward that reads the pages. On the CPU every copy is immediate.
(SGLang's ``HiCacheController``.)
"""

import dataclasses
import time

import torch

from .hicache_storage import HiCacheFile
from .host_kv_pool import HostKVPool
from .kv_cache import PagedKVPool


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
        self.pending_writes = []  # (copy done, staged pages, host pages), not yet in the host pool
        self.in_flight_loads = []  # (copy done, the pinned buffer the copy still reads)
        self.stats = HiCacheStats()

    def slots(self, pages: list[int], device: torch.device) -> torch.Tensor:
        """The device pool slots of ``pages``, in order: page * page_size + 0 .. page_size - 1."""
        pages = torch.tensor(pages, dtype=torch.int64, device=device)
        return (pages[:, None] * self.page_size + torch.arange(self.page_size, device=device)).flatten()

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

    def write(self, device_pages: list[int], host_pages: list[int]) -> None:
        """Copy device pages to host pages (a write-back on eviction, or a write-through)."""
        kv = self._pages_first(device_pages)  # the gather, in the step's stream: before any reuse of the pages
        self.stats.bytes_written += kv.numel() * kv.element_size()
        if self.copy_stream is None:
            self.host_pool.kv[host_pages] = kv
            return
        staged = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True).copy_(kv, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending_writes.append((done, staged, host_pages))

    def settle_writes(self) -> None:
        """Put every started device -> host copy into the host pool (waiting for those still running).
        Called before anything reads the host pool."""
        for done, staged, host_pages in self.pending_writes:
            done.synchronize()
            self.host_pool.kv[host_pages] = staged
        self.pending_writes.clear()

    def load(self, host_pages: list[int], device_pages: list[int]) -> None:
        """Copy host pages into device pages, to be read by the next forward."""
        started = time.perf_counter()
        self.settle_writes()
        index = torch.tensor(host_pages, dtype=torch.int64)
        pool = self.host_pool.kv
        staged = torch.empty((len(host_pages), *pool.shape[1:]), dtype=pool.dtype, pin_memory=self.copy_stream is not None)
        torch.index_select(pool, 0, index, out=staged)  # whole pages: a large copy each
        self._to_device(staged, device_pages)
        self.stats.load_seconds += time.perf_counter() - started

    def store(self, host_pages: list[int], keys: list[str]) -> None:
        """Write host pages to files, one per page, under ``keys``."""
        self.settle_writes()
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
        """Copy pages read from files into device pages."""
        started = time.perf_counter()
        staged = torch.stack(pages)
        self._to_device(staged.pin_memory() if self.copy_stream is not None else staged, device_pages)
        self.stats.load_seconds += time.perf_counter() - started

    def _to_device(self, staged: torch.Tensor, device_pages: list[int]) -> None:
        """One copy of the gathered pages across, then a scatter into the device pool."""
        self.stats.bytes_loaded += staged.numel() * staged.element_size()
        if self.copy_stream is None:
            self._scatter(staged, device_pages)
            return
        self.in_flight_loads = [(done, buf) for done, buf in self.in_flight_loads if not done.query()]
        step_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):  # the running step goes on meanwhile
            arrived = staged.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        step_stream.wait_stream(self.copy_stream)  # the scatter, and the forward after it, wait for the copy
        arrived.record_stream(step_stream)  # made on the side stream, used on the step's
        self._scatter(arrived, device_pages)
        self.in_flight_loads.append((done, staged))
