"""The page allocator: which fixed-size pages of the KV pool are free.

The KV pool is cut into pages of ``page_size`` token slots. A request owns a
*page table*: the list of physical pages holding its tokens in order, so
token ``p`` lives in slot ``p % page_size`` of page ``page_table[p // page_size]``.
Pages are handed out as a sequence grows and all come back when it ends, so
memory follows the tokens in use, and any free page fits any request.

Stage 12: attention reads a run of consecutive pages in one piece
(``page_runs.py``), so the allocator hands pages out in runs. A request's next
page is the one right after its last, while that one is free; a new run starts
in the middle of the largest free stretch of the pool, so the runs already on
either side of it keep room to grow. When the pool is fragmented, pages come
from wherever they are free: runs get shorter, never wrong.
"""

import numpy as np


class PageAllocator:
    """Page ids ``0 .. num_pages - 1``, free or in use, handed out in runs of consecutive ids."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("the KV pool must hold at least one page")
        self.num_pages = num_pages
        self.free = np.ones(num_pages, dtype=bool)  # free[page]
        self.num_free = num_pages

    def alloc_pages(self, count: int, after: int | None = None, expected: int = 0) -> list[int]:
        """Take ``count`` free pages; raise if there are not that many.

        ``after``: the caller's last page, whose run these pages should continue.
        ``expected``: how many pages the caller may still come to need, so a new
        run starts where that many fit.
        """
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} pages but only {self.num_free} are free")
        pages: list[int] = []
        start = None if after is None else after + 1
        while len(pages) < count:
            wanted = count - len(pages)
            if start is None or start >= self.num_pages or not self.free[start]:
                start = self._new_run_start(max(wanted, expected))
            end = min(start + wanted, self.num_pages)
            taken = np.flatnonzero(~self.free[start:end])  # stop at the first page in use (or the pool's end)
            if len(taken):
                end = start + int(taken[0])
            self.free[start:end] = False
            pages += range(start, end)
            start = end
        self.num_free -= count
        return pages

    def _new_run_start(self, wanted: int) -> int:
        """Where a new run of ``wanted`` pages goes: centred in the largest free stretch
        (at its start when it is shorter), leaving the run before it room to grow."""
        edges = np.flatnonzero(np.diff(self.free, prepend=False, append=False))  # where free stretches start and end
        starts, ends = edges[::2], edges[1::2]
        largest = int(np.argmax(ends - starts))
        start, length = int(starts[largest]), int(ends[largest] - starts[largest])
        return start + max(length - wanted, 0) // 2

    def free_pages(self, pages: list[int]) -> None:
        """Return pages to the pool; freeing a page that is not in use is a bug."""
        if not pages:
            return
        index = np.asarray(pages)
        if self.free[index].any() or len(set(pages)) != len(pages):
            raise RuntimeError(f"page {next(p for p in pages if self.free[p] or pages.count(p) > 1)} is freed but was not allocated")
        self.free[index] = True
        self.num_free += len(pages)

    @property
    def in_use(self) -> set[int]:
        """The pages handed out and not yet freed."""
        return set(np.flatnonzero(~self.free).tolist())
