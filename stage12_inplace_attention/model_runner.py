"""Run the model on a batch of requests and sample their next tokens.

Data flow of one step:
    requests -> flat input_ids / positions (only tokens not yet in the cache)
    -> model forward with this stage's attention backend -> last hidden row per request
    -> logits -> sampler -> one new token per request.
The same call serves prefill (a whole prompt is uncached) and decode (only
the newest token is), which is what lets later stages mix the two. From
stage 09 on, a pure decode batch replays a recorded CUDA graph instead
(``cuda_graph_runner.py``).

Stage 10 splits a step in two: ``launch`` queues the forward and the
sampling on the device and returns at once; ``LaunchedStep.tokens()`` waits
for the sampled tokens. Between the two the host is free to prepare the next
step, which may feed tokens the host has not read yet: such a token enters
the batch as a placeholder (``-1 - j``: the j-th token the step before
sampled), and the device swaps in the real token before the forward
(SGLang's "future token ids").

Stage 12 (``attention_backend="runs"``, the default on CUDA) hands each batch
the runs of pool slots that hold each sequence's cached keys, so attention reads
them in place (``page_runs.py``); the allocator keeps a request's pages
consecutive so those runs are long. ``"gather"`` keeps stage 11's packed copy.
"""

import itertools
import math
import sys

import torch

from common.attention import FLASH_DTYPES, varlen_attn
from common.config import ModelConfig
from common.loader import load_model, resolve_model_path
from common.memory import is_out_of_memory
from common.sampling import Sampler

from .attention_backend import ATTENTION_BACKENDS
from .cuda_graph_runner import CudaGraphRunner
from .engine_args import EngineArgs
from .forward_batch import ForwardBatch
from .kv_cache import DevicePageTables, PagedKVPool
from .page_allocator import PageAllocator
from .parallel import TensorParallelShard, broadcast_batch, rank_device, tp_group_active
from .radix_cache import RadixCache
from .request import Request

CPU_KV_CACHE_BYTES = 512 << 20  # default pool on CPU; on CUDA a fraction of free memory
CUDA_FREE_MEMORY_FRACTION = 0.8  # the rest is headroom for activations (long prefills)
MAX_RUNNING_REQUESTS = 1024  # rows of the device page tables: requests that can hold pages at once


class ModelRunner:
    """Owns this rank's model weights and KV pool on one device and runs forward steps.

    With tensor parallelism, rank 0 (the engine's process) also owns the
    allocator, prefix cache and sampler: it plans each step, broadcasts the
    ``ForwardBatch``, and every rank runs the forward on its shard.
    """

    def __init__(self, args: EngineArgs, tp_rank: int = 0, num_pages: int | None = None,
                 ranks_per_node: int | None = None):
        # A node's ranks take GPUs base_gpu_id, + gpu_id_step, ... (SGLang's placement).
        local_rank = tp_rank % (ranks_per_node or max(args.tp_size, args.ep_size))
        self.device = device = rank_device(args.device, args.base_gpu_id + local_rank * args.gpu_id_step)
        shard = None
        if max(args.tp_size, args.ep_size) > 1:  # tp_rank is this process's rank among all of them
            shard = TensorParallelShard(ModelConfig.from_file(resolve_model_path(args.model_path)), tp_rank, args.tp_size, args.ep_size)
        self.model, self.config, self.model_folder = load_model(args.model_path, device=device, dtype=args.dtype, shard=shard)
        self.dtype = self.model.lm_head.weight.dtype
        for layer in self.model.model.layers:  # count routed tokens per expert (load-balance inspection)
            if hasattr(layer.mlp, "expert_token_counts"):
                layer.mlp.expert_token_counts = torch.zeros(self.config.num_experts, dtype=torch.long, device=device)
        self.sampler = Sampler(device, args.seed)
        self.page_size = args.page_size
        local_config = shard.local_config() if shard else self.config  # this rank's KV heads
        if num_pages is None:
            num_pages = self.kv_budget(args.kv_cache_bytes) // PagedKVPool.bytes_per_page(local_config, args.page_size, self.dtype)
        if num_pages < 1:
            raise ValueError(f"kv_cache_bytes={args.kv_cache_bytes} is smaller than one page of {args.page_size} tokens")
        # One page more than the allocator hands out: decode graphs write their padding rows there.
        self.pool = PagedKVPool(local_config, num_pages + 1, args.page_size, device, self.dtype)
        self.allocator = PageAllocator(num_pages)
        max_pages_per_request = self.pages_for(self.config.max_position_embeddings)
        self.page_tables = DevicePageTables(min(num_pages, MAX_RUNNING_REQUESTS), max_pages_per_request, device)
        self.attention_backend = ATTENTION_BACKENDS[args.attention_backend](self.pool, self.page_tables)
        self.radix_cache = None if args.disable_radix_cache else RadixCache(self.allocator, args.page_size)
        self.use_cuda_graph = not args.disable_cuda_graph and device.type == "cuda"
        self.cuda_graph_max_bs = args.cuda_graph_max_bs
        self.graphs: CudaGraphRunner | None = None  # set by init_cuda_graphs, once every rank is up
        # The tokens the latest launched step sampled, on the device, and which request each belongs to:
        # the next step's placeholders index into them.
        self.last_sampled: torch.Tensor | None = None
        self.last_sampled_index: dict[int, int] = {}  # request id -> its row of last_sampled

    def init_cuda_graphs(self, progress: bool = True) -> None:
        """Record the decode graphs (CUDA only; every rank at the same time, since TP's
        collectives are recorded too). Graphs need the flash kernel: fp32 runs eagerly."""
        if not self.use_cuda_graph or self.dtype not in FLASH_DTYPES or varlen_attn is None:
            return
        graphs = CudaGraphRunner(self.model, self.attention_backend, self.allocator.num_pages,
                                 self.cuda_graph_max_bs, self.config.max_position_embeddings, capture=True)
        try:
            with torch.inference_mode():
                graphs.capture_all(progress)
        except RuntimeError as error:  # OutOfMemoryError is one
            if progress:
                print(file=sys.stderr)  # end the progress line before the error
            if not is_out_of_memory(error):
                raise
            del graphs
            torch.cuda.empty_cache()
            raise ValueError(f"recording the decode CUDA graphs ran out of device memory beside the KV pool "
                             f"({self.pool.nbytes / 2**30:.1f} GiB). Give them room: a smaller kv_cache_bytes, "
                             f"a smaller cuda_graph_max_bs, or disable_cuda_graph ({str(error).splitlines()[0]})") from error
        self.graphs = graphs  # only once every graph is recorded

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
        request.page_table, request.prefix_node, request.shared_pages = list(pages), node, len(pages)
        request.num_cached = request.cached_tokens = len(pages) * self.page_size
        self.page_tables.take_row(request)
        return True

    def expected_pages(self, request: Request, pages_held: int, new_token_ratio: float) -> int:
        """Pages the request is expected to still need beyond the ``pages_held`` it has."""
        remaining = request.params.max_tokens - request.num_generated
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

    def pages_needed(self, requests: list[Request], new_lengths: list[int]) -> int:
        """New pages a step needs to store ``new_lengths[i]`` more tokens of each request."""
        return sum(max(self.pages_for(r.num_cached + n) - len(r.page_table), 0) for r, n in zip(requests, new_lengths))

    def evictable_pages(self) -> int:
        return 0 if self.radix_cache is None else self.radix_cache.evictable_pages

    def allocate_cache(self, request: Request, num_tokens: int) -> None:
        """Grow the request's page table to cover its first ``num_tokens`` tokens, evicting cached prefixes if needed."""
        missing = self.pages_for(num_tokens) - len(request.page_table)
        if missing > self.allocator.num_free and self.radix_cache is not None:
            self.radix_cache.evict(missing - self.allocator.num_free)
        if missing > 0:
            # Continue the request's last run, and leave room for the most it may still need.
            last = request.page_table[-1] if request.page_table else None
            expected = self.pages_for(request.max_seq_len) - len(request.page_table)
            request.page_table += self.allocator.alloc_pages(missing, after=last, expected=expected)

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
        self.allocator.free_pages(table[request.shared_pages : already] + table[cached_pages:])
        self.radix_cache.unlock(request.prefix_node)
        request.page_table, request.prefix_node, request.shared_pages = [], None, 0
        self.page_tables.release_row(request)

    def cache_unfinished(self, request: Request) -> None:
        """Hand a running request's newly completed pages to the prefix cache, keeping them locked.

        Other requests can then reuse a prompt while it is still running
        (in-batch prefix sharing, the next turn of a chat).
        """
        page = self.page_size
        cached_pages = request.num_cached // page
        if self.radix_cache is None or request.prefix_node is None or cached_pages <= request.shared_pages:
            return
        tokens = request.all_ids[: cached_pages * page]
        already = self.radix_cache.insert(tokens, request.page_table[:cached_pages]) // page
        self.allocator.free_pages(request.page_table[request.shared_pages : already])  # someone cached these first
        pages, node = self.radix_cache.match_prefix(tokens)
        self.radix_cache.lock(node)
        self.radix_cache.unlock(request.prefix_node)
        request.page_table[:cached_pages] = pages
        # Entries from the first page that may have changed must reach the device again.
        request.pages_on_device = min(request.pages_on_device, request.shared_pages)
        request.prefix_node, request.shared_pages = node, cached_pages

    def forget_step(self, request: Request) -> None:
        """After a failed forward: trust only the K/V the prefix cache holds for this request,
        so none of the step's half-written pages is cached when its pages are freed."""
        request.num_cached = request.shared_pages * self.page_size

    def flush_cache(self) -> None:
        if self.radix_cache is not None:
            self.radix_cache.flush()

    @torch.inference_mode()
    def launch(self, requests: list[Request], new_lengths: list[int]) -> "LaunchedStep":
        """Queue one forward over the next ``new_lengths[i]`` uncached tokens of each request,
        and the sampling after it; return without waiting for the device.

        A request whose tokens are now all cached gets a sampled next token,
        pending until ``tokens()`` reads it; one that fed only a chunk of its
        prompt gets None (nothing to sample yet). One pass over the requests
        builds plain lists; ``ForwardBatch.build`` sends them to the device in
        one copy.
        """
        input_ids, positions, seq_rows, seq_lens, complete = [], [], [], [], []
        scored, scored_rows = [], []  # prompt rows to score: (its state, position), batch row
        updates = ([], [], [])  # page-table entries the device has not seen yet
        placeholders = False
        for i, (request, n) in enumerate(zip(requests, new_lengths)):
            start, end = request.num_cached, request.num_cached + n
            for position in request.sampling.prompt_rows(start, end):  # prompt log-probabilities asked for
                scored.append((request.sampling, position))
                scored_rows.append(len(input_ids) + position - start)
            self.allocate_cache(request, end)
            known = request.all_ids[start:end]
            input_ids += known
            if len(known) < n:  # its newest token is pending: the step in flight samples it
                input_ids.append(-1 - self.last_sampled_index[request.id])
                placeholders = True
            positions += range(start, end)
            seq_rows.append(request.table_row)
            seq_lens.append(end)
            self.page_tables.pending_updates(request, *updates)
            request.num_cached = end
            if end == request.seq_len:
                complete.append(i)
                request.pending_tokens += 1
        ends = list(itertools.accumulate(new_lengths))
        last_rows = [ends[i] - 1 for i in complete]  # each complete request's last token
        # Every logits row, in batch order: a one-token prompt chunk that is scored looks like a decode row,
        # and a decode graph returns its rows in batch order.
        rows = sorted(last_rows + scored_rows) if scored else last_rows
        runs = self.attention_backend.batch_runs(requests, seq_lens, new_lengths)
        batch = ForwardBatch.build(self.device, input_ids, positions, seq_rows, new_lengths, seq_lens, rows, updates, runs)
        if placeholders:  # in place, on the device: the packed tensor other ranks receive is resolved too
            ids = batch.input_ids
            ids.copy_(torch.where(ids < 0, self.last_sampled[(-1 - ids).clamp(min=0)], ids))
        if tp_group_active():
            broadcast_batch(batch, self.device)  # the other ranks run the same forward on their shards
        logits = self.forward(batch)
        if scored:
            where = {row: j for j, row in enumerate(rows)}
            self.sampler.record_prompt_logprobs(logits[[where[r] for r in scored_rows]], scored)
            logits = logits[[where[r] for r in last_rows]]
        sampled = self.sampler(logits, [requests[i].sampling for i in complete]) if complete else None
        self.last_sampled = sampled
        self.last_sampled_index = {requests[i].id: j for j, i in enumerate(complete)}
        return LaunchedStep(requests, complete, sampled)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Run the model on a built batch; logits ``[len(logits_rows), vocab]`` (None if none are wanted)."""
        self.page_tables.apply(batch.update_rows, batch.update_columns, batch.update_pages)
        if self.graphs is not None and (bucket := self.graphs.bucket(batch)) is not None:
            return self.graphs.run(batch, bucket)  # a decode batch: replay (the graph gives the logits)
        attention = self.attention_backend.prepare(batch)
        hidden = self.model(batch.input_ids, batch.positions, attention)
        if batch.logits_rows.numel() == 0:  # only prompt chunks ran: nothing to sample
            return None
        return self.model.compute_logits(hidden[batch.logits_rows])


class LaunchedStep:
    """A step queued on the device. ``tokens()`` waits for it and returns one entry per
    request: its sampled token, or None where only a prompt chunk ran."""

    def __init__(self, requests: list[Request], complete: list[int], sampled: torch.Tensor | None):
        self.requests, self.complete = requests, complete
        self.done = None
        if sampled is not None and sampled.is_cuda:
            # Start the copy to the host now; reading it later waits for this step only.
            sampled = sampled.to("cpu", non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        self.sampled = sampled

    def tokens(self) -> list[int | None]:
        if self.done is not None:
            self.done.synchronize()
        next_tokens: list[int | None] = [None] * len(self.requests)
        if self.sampled is not None:
            for i, token in zip(self.complete, self.sampled.tolist()):
                next_tokens[i] = token
        return next_tokens
