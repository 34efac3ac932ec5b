"""Stage 17's second tier: keys and values of prefixes evicted from the device, in host memory.

The device pool (``kv_cache.py``) is fast and small next to the prefixes
worth keeping; host memory is several times larger. The host pool is laid
out page first, ``[pages, 2 (k, v), layers, page_size, kv_heads, head_dim]``:
one page, all its layers, is one contiguous block, so gathering pages on the
host is a few large memory copies (the device pool, layer first, is what
attention wants; the controller turns one layout into the other on the
device, where it is cheap). On CUDA it is pinned (page-locked) memory: only
pinned memory can be copied to or from the GPU without the host waiting. Its own ``PageAllocator`` says which host pages are
free; the radix tree says which prefix each one holds. (SGLang's
``MHATokenToKVPoolHost``.)
"""

import torch

from .kv_cache import PagedKVPool
from .page_allocator import PageAllocator


class HostKVPool:
    """``num_pages`` pages of keys and values in host memory, each page one block: ``kv[page]``."""

    def __init__(self, device_pool: PagedKVPool, num_pages: int):
        self.page_size = device_pool.page_size
        layers, _, heads, dim = device_pool.k.shape
        self.kv = torch.empty((num_pages, 2, layers, self.page_size, heads, dim), dtype=device_pool.k.dtype,
                              pin_memory=device_pool.k.is_cuda)
        self.allocator = PageAllocator(num_pages)

    @staticmethod
    def num_pages(device_pages: int, page_bytes: int, ratio: float, size_gb: float) -> int:
        """Pages of the host pool: ``size_gb`` gigabytes when given (SGLang's ``--hicache-size``),
        else ``ratio`` times the device pool (``--hicache-ratio``)."""
        if size_gb > 0:
            return max(int(size_gb * 1e9) // page_bytes, 1)
        return max(int(device_pages * ratio), 1)
