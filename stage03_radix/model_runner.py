"""Run the model on a batch of requests and sample their next tokens.

Data flow of one step:
    requests -> flat input_ids / positions (only tokens not yet in the cache)
    -> model forward with this stage's attention backend -> last hidden row per request
    -> logits -> sampler -> one new token per request.
The same call serves prefill (a whole prompt is uncached) and decode (only
the newest token is), which is what lets later stages mix the two.
"""

import math

import torch

from common.loader import load_model
from common.sampling import Sampler
from .kv_cache import PagedAttention, PagedKVPool, token_slots
from .page_allocator import PageAllocator
from .radix_cache import RadixCache
from .request import Request

CPU_KV_CACHE_BYTES = 512 << 20  # default pool on CPU; on CUDA a fraction of free memory
CUDA_FREE_MEMORY_FRACTION = 0.8  # the rest is headroom for activations (long prefills)


class ModelRunner:
    """Owns the model weights on one device and runs forward steps."""

    def __init__(
        self, model_path, device: torch.device, dtype: torch.dtype | None, seed: int | None,
        page_size: int, kv_cache_bytes: int | None, disable_radix_cache: bool,
    ):
        self.device = device
        self.model, self.config, self.model_folder = load_model(model_path, device=device, dtype=dtype)
        self.dtype = self.model.lm_head.weight.dtype
        self.sampler = Sampler(device, seed)
        self.page_size = page_size
        num_pages = self.kv_budget(kv_cache_bytes) // PagedKVPool.bytes_per_page(self.config, page_size, self.dtype)
        if num_pages < 1:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} is smaller than one page of {page_size} tokens")
        self.pool = PagedKVPool(self.config, num_pages, page_size, device, self.dtype)
        self.allocator = PageAllocator(num_pages)
        self.radix_cache = None if disable_radix_cache else RadixCache(self.allocator, page_size)

    def kv_budget(self, kv_cache_bytes: int | None) -> int:
        """Bytes for the KV pool: as asked, else a default for the device."""
        if kv_cache_bytes is not None:
            return kv_cache_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * CUDA_FREE_MEMORY_FRACTION)
        return CPU_KV_CACHE_BYTES

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def admit(self, request: Request, running: list[Request]) -> bool:
        """Admit only if the pages it may ever need are free after those promised to running requests.

        The longest cached prefix of the prompt is reused first (its pages are
        locked, so they cannot be evicted while the request runs); pages held
        only by the prefix cache count as free, since they can be evicted.
        Returns False, changing nothing, when the request must wait.
        """
        pages, node = [], None
        if self.radix_cache is not None:
            # Leave the last prompt token uncached: its forward gives the first output's logits.
            pages, node = self.radix_cache.match_prefix(request.prompt_ids[:-1])
            self.radix_cache.lock(node)
        promised = sum(self.pages_for(r.max_seq_len) - len(r.page_table) for r in running)
        available = self.allocator.num_free + self.evictable_pages() - promised
        if self.pages_for(request.max_seq_len) - len(pages) > available:
            if node is not None:
                self.radix_cache.unlock(node)
            return False
        request.page_table, request.prefix_node = list(pages), node
        request.num_cached = request.cached_tokens = len(pages) * self.page_size
        return True

    def evictable_pages(self) -> int:
        return 0 if self.radix_cache is None else self.radix_cache.evictable_pages

    def allocate_cache(self, request: Request) -> None:
        """Grow the request's page table to cover all its tokens, evicting cached prefixes if needed."""
        missing = self.pages_for(request.seq_len) - len(request.page_table)
        if missing > self.allocator.num_free and self.radix_cache is not None:
            self.radix_cache.evict(missing - self.allocator.num_free)
        if missing > 0:
            request.page_table += self.allocator.alloc_pages(missing)

    def free_cache(self, request: Request) -> None:
        """Give the request's pages to the prefix cache (whole pages) or back to the allocator."""
        if self.radix_cache is None or request.prefix_node is None:
            self.allocator.free_pages(request.page_table)
            request.page_table = []
            return
        page, table = self.page_size, request.page_table
        cached_pages = request.num_cached // page  # whole pages whose K/V are all computed
        already = self.radix_cache.insert(request.all_ids[: cached_pages * page], table[:cached_pages]) // page
        # Pages the tree already had (someone inserted the same tokens meanwhile) and the
        # partial last page stay ours to free; the tree now owns the rest.
        self.allocator.free_pages(table[request.cached_tokens // page : already] + table[cached_pages:])
        self.radix_cache.unlock(request.prefix_node)
        request.page_table, request.prefix_node = [], None

    def flush_cache(self) -> None:
        if self.radix_cache is not None:
            self.radix_cache.flush()

    @torch.inference_mode()
    def step(self, requests: list[Request]) -> list[int]:
        """One forward over every request's uncached tokens; returns the sampled next tokens."""
        input_ids, positions, new_lengths, slots = [], [], [], []
        for request in requests:
            self.allocate_cache(request)
            slots.append(token_slots(request.page_table, request.num_cached, request.seq_len, self.page_size))
            new_tokens = request.all_ids[request.num_cached :]
            input_ids += new_tokens
            positions += range(request.num_cached, request.seq_len)
            new_lengths.append(len(new_tokens))
        attention = PagedAttention(
            self.pool, torch.cat(slots).to(self.device), [r.page_table for r in requests], new_lengths, [r.seq_len for r in requests]
        )
        hidden = self.model(
            torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device), attention
        )
        last_rows = torch.tensor(new_lengths, device=self.device).cumsum(0) - 1  # each request's last token
        logits = self.model.compute_logits(hidden[last_rows])
        for request in requests:
            request.num_cached = request.seq_len
        return self.sampler(
            logits,
            [r.params for r in requests],
            [r.prompt_ids for r in requests],
            [r.output_ids for r in requests],
            [r.generator for r in requests],
        )
