"""The page allocator: which fixed-size pages of the KV pool are free.

The KV pool is cut into pages of ``page_size`` token slots. A request owns a
*page table*: the list of physical pages holding its tokens in order, so
token ``p`` lives in slot ``p % page_size`` of page ``page_table[p // page_size]``.
Pages are handed out as a sequence grows and all come back when it ends, so
memory follows the tokens in use, and any free page fits any request.
"""


class PageAllocator:
    """A free list of page ids ``0 .. num_pages - 1``."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("the KV pool must hold at least one page")
        self.num_pages = num_pages
        self.free_list = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self.in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def alloc_pages(self, count: int) -> list[int]:
        """Take ``count`` free pages; raise if there are not that many."""
        if count > len(self.free_list):
            raise RuntimeError(f"asked for {count} pages but only {len(self.free_list)} are free")
        pages = [self.free_list.pop() for _ in range(count)]
        self.in_use.update(pages)
        return pages

    def free_pages(self, pages: list[int]) -> None:
        """Return pages to the free list; freeing a page that is not in use is a bug."""
        for page in pages:
            if page not in self.in_use:
                raise RuntimeError(f"page {page} is freed but was not allocated")
            self.in_use.remove(page)
            self.free_list.append(page)
