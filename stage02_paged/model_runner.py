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

        Pages are allocated as tokens arrive, but promising the worst case up
        front means a running request never finds the pool empty mid-decode.
        An admitted request also takes its row of the device page tables.
        Returns False, changing nothing, when the request must wait.
        """
        promised = sum(self.pages_for(r.max_seq_len) - len(r.page_table) for r in running)
        if self.pages_for(request.max_seq_len) > self.allocator.num_free - promised or not self.page_tables.free_rows:
            return False
        self.page_tables.take_row(request)
        return True

    def allocate_cache(self, request: Request) -> None:
        """Grow the request's page table to cover all its tokens."""
        missing = self.pages_for(request.seq_len) - len(request.page_table)
        if missing > 0:
            request.page_table += self.allocator.alloc_pages(missing)

    def free_cache(self, request: Request) -> None:
        self.allocator.free_pages(request.page_table)
        request.page_table = []
        self.page_tables.release_row(request)

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
