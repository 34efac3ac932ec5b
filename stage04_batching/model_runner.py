"""Run the model on a batch of requests and sample their next tokens.

Data flow of one step:
    requests -> flat input_ids / positions (only tokens not yet in the cache)
    -> model forward with this stage's attention backend -> last hidden row per request
    -> logits -> sampler -> one new token per request.
The same call serves prefill (a whole prompt is uncached) and decode (only
the newest token is), which is what lets later stages mix the two.
"""

import itertools
import math

import torch

from common.loader import load_model
from common.sampling import Sampler

from .attention_backend import ATTENTION_BACKENDS
from .engine_args import EngineArgs
from .forward_batch import ForwardBatch
from .kv_cache import DevicePageTables, PagedKVPool
from .page_allocator import PageAllocator
from .radix_cache import RadixCache
from .request import Request

CPU_KV_CACHE_BYTES = 512 << 20  # default pool on CPU; on CUDA a fraction of free memory
CUDA_FREE_MEMORY_FRACTION = 0.8  # the rest is headroom for activations (long prefills)
MAX_RUNNING_REQUESTS = 1024  # rows of the device page tables: requests that can hold pages at once


class ModelRunner:
    """Owns the model weights on one device and runs forward steps."""

    def __init__(self, args: EngineArgs):
        self.device = device = args.device
        self.model, self.config, self.model_folder = load_model(args.model_path, device=device, dtype=args.dtype)
        self.dtype = self.model.lm_head.weight.dtype
        self.sampler = Sampler(device, args.seed)
        self.page_size = args.page_size
        num_pages = self.kv_budget(args.kv_cache_bytes) // PagedKVPool.bytes_per_page(self.config, args.page_size, self.dtype)
        if num_pages < 1:
            raise ValueError(f"kv_cache_bytes={args.kv_cache_bytes} is smaller than one page of {args.page_size} tokens")
        self.pool = PagedKVPool(self.config, num_pages, args.page_size, device, self.dtype)
        self.allocator = PageAllocator(num_pages)
        max_pages_per_request = self.pages_for(self.config.max_position_embeddings)
        self.page_tables = DevicePageTables(min(num_pages, MAX_RUNNING_REQUESTS), max_pages_per_request, device)
        self.attention_backend = ATTENTION_BACKENDS[args.attention_backend](self.pool, self.page_tables)
        self.radix_cache = None if args.disable_radix_cache else RadixCache(self.allocator, args.page_size)

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

    def admit(self, request: Request, running: list[Request], new_token_ratio: float) -> bool:
        """Admit if the pages it is expected to need fit next to those expected by running requests.

        Expected, not worst case: each request is promised pages for
        ``new_token_ratio`` of its remaining max_tokens (the scheduler retracts
        requests when that guess turns out short). The longest cached prefix
        is reused first and locked; pages held only by the prefix cache count
        as free, since they can be evicted. An admitted request also takes its
        row of the device page tables. Returns False, changing nothing, when
        the request must wait.
        """
        pages, node = [], None
        if self.radix_cache is not None:
            # Leave the last token uncached: its forward gives the next token's logits.
            pages, node = self.radix_cache.match_prefix(request.all_ids[:-1][: request.sampling.reusable_tokens])
            self.radix_cache.lock(node)
        promised = sum(self.expected_pages(r, len(r.page_table), new_token_ratio) for r in running)
        if self.expected_pages(request, len(pages), new_token_ratio) > self.available_pages() - promised or not self.page_tables.free_rows:
            if node is not None:
                self.radix_cache.unlock(node)
            return False
        request.page_table, request.prefix_node = list(pages), node
        request.num_cached = request.cached_tokens = len(pages) * self.page_size
        self.page_tables.take_row(request)
        return True

    def expected_pages(self, request: Request, pages_held: int, new_token_ratio: float) -> int:
        """Pages the request is expected to still need beyond the ``pages_held`` it has."""
        remaining = request.params.max_tokens - len(request.output_ids)
        expected_len = min(request.seq_len + math.ceil(remaining * new_token_ratio), request.max_seq_len)
        return max(self.pages_for(expected_len) - pages_held, 0)

    def peek_cached_length(self, request: Request) -> int:
        """How many tokens of the request the prefix cache holds now (no lock taken)."""
        if self.radix_cache is None:
            return 0
        return len(self.radix_cache.match_prefix(request.all_ids[:-1][: request.sampling.reusable_tokens])[0]) * self.page_size

    def available_pages(self) -> int:
        """Free pages plus pages only the prefix cache holds (evictable on demand)."""
        return self.allocator.num_free + self.evictable_pages()

    def decode_pages_needed(self, requests: list[Request]) -> int:
        """New pages the next decode step needs: one for each request whose last page is full."""
        return sum(self.pages_for(r.seq_len) - len(r.page_table) for r in requests)

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
            self.page_tables.release_row(request)
            return
        page, table = self.page_size, request.page_table
        cached_pages = request.num_cached // page  # whole pages whose K/V are all computed
        already = self.radix_cache.insert(request.all_ids[: cached_pages * page], table[:cached_pages]) // page
        # Pages the tree already had (someone inserted the same tokens meanwhile) and the
        # partial last page stay ours to free; the tree now owns the rest.
        self.allocator.free_pages(table[request.cached_tokens // page : already] + table[cached_pages:])
        self.radix_cache.unlock(request.prefix_node)
        request.page_table, request.prefix_node = [], None
        self.page_tables.release_row(request)

    def forget_step(self, request: Request) -> None:
        """After a failed forward: trust only the K/V the prefix cache lent, so none of the
        step's half-written pages is cached when the request's pages are freed."""
        request.num_cached = request.cached_tokens

    def flush_cache(self) -> None:
        if self.radix_cache is not None:
            self.radix_cache.flush()

    @torch.inference_mode()
    def step(self, requests: list[Request]) -> list[int]:
        """One forward over every request's uncached tokens; returns the sampled next tokens.

        One pass over the requests builds plain lists; ``ForwardBatch.build``
        sends them to the device in one copy; reading the sampled tokens is the
        step's one wait for the GPU.
        """
        input_ids, positions, seq_rows, new_lengths, seq_lens = [], [], [], [], []
        scored, scored_rows = [], []  # prompt rows to score: (its state, position), batch row
        updates = ([], [], [])  # page-table entries the device has not seen yet
        for request in requests:
            self.allocate_cache(request)
            start, end = request.num_cached, request.seq_len
            for position in request.sampling.prompt_rows(start, end):  # prompt log-probabilities asked for
                scored.append((request.sampling, position))
                scored_rows.append(len(input_ids) + position - start)
            input_ids += request.all_ids[start:end]
            positions += range(start, end)
            seq_rows.append(request.table_row)
            new_lengths.append(end - start)
            seq_lens.append(end)
            self.page_tables.pending_updates(request, *updates)
            request.num_cached = end
        last_rows = [n - 1 for n in itertools.accumulate(new_lengths)]  # each request's last token
        rows = sorted(last_rows + scored_rows) if scored else last_rows  # every logits row, in batch order
        batch = ForwardBatch.build(self.device, input_ids, positions, seq_rows, new_lengths, seq_lens, rows, updates)
        logits = self.forward(batch)
        if scored:
            where = {row: j for j, row in enumerate(rows)}
            self.sampler.record_prompt_logprobs(logits[[where[r] for r in scored_rows]], scored)
            logits = logits[[where[r] for r in last_rows]]
        return self.sampler(logits, [r.sampling for r in requests]).tolist()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the model on a built batch; logits ``[len(logits_rows), vocab]``."""
        self.page_tables.apply(batch.update_rows, batch.update_columns, batch.update_pages)
        attention = self.attention_backend.prepare(batch)
        hidden = self.model(batch.input_ids, batch.positions, attention)
        return self.model.compute_logits(hidden[batch.logits_rows])
