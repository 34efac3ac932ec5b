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

Stage 13: before sampling, the rows of requests that follow a grammar lose
every token their grammar forbids (``grammar.py``); the masks are filled on
the host while the device runs the forward.

Stage 14: a request may carry a draft, guesses of its next tokens
(``ngram_draft.py``, ``draft_model.py``). It feeds its newest token and the
guesses as one causal chunk, every row of the chunk gets logits, and
``speculative_step.py`` keeps the guesses the target agrees with, plus one
token of the target's own. ``truncate_cache`` gives back the pages of the rest.

Stage 15: a request may name a LoRA adapter. The pool (``lora_pool.py``)
gives each adapter of the step a device slot, every token row carries its
slot, and the wrapped projections add each row's adapter (``lora_layers.py``).
The prefix cache keeps each adapter's prefixes apart: the same tokens under
another adapter have other keys and values.

Stage 17: with the hierarchical cache, a prefix evicted from the pool may
still be on the host or in files; admitting a request loads its pages back
(``load_back``) instead of computing them again (``hiradix_cache.py``).

Stage 19: with pipeline ranks (``pp_size``), this rank runs only its layers
(``pipeline.py``). Rank 0 sends its hidden states on and gets the logits back
later: ``launch`` then returns a ``PipelinedStep``, sampled once they come.
"""

import functools
import itertools
import math
import sys
import time

import torch

from common.attention import FLASH_DTYPES, varlen_attn
from common.config import ModelConfig
from common.device_copy import copy_to_device
from common.loader import load_model, resolve_model_path
from common.memory import is_out_of_memory
from common.sampling import Sampler

from .attention_backend import ATTENTION_BACKENDS
from .cuda_graph_runner import CudaGraphRunner
from .engine_args import EngineArgs
from .forward_batch import ForwardBatch
from .grammar import apply_grammar_masks
from .hiradix_cache import HiRadixCache, make_prefix_cache
from .kv_cache import DevicePageTables, PagedKVPool
from .lora_pool import make_lora_pool
from .page_allocator import PageAllocator
from .parallel import TensorParallelShard, broadcast_batch, rank_device, tp_group_active
from .pipeline import PipelineLinks, PipelineShard, layer_partition
from .request import Request
from .speculative_step import tree_layout, verify_drafts

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
        local_rank = tp_rank % (ranks_per_node or args.world_size)
        self.device = device = rank_device(args.device, args.base_gpu_id + local_rank * args.gpu_id_step)
        shard, tp = None, max(args.tp_size, args.ep_size)
        pp_rank, tp_local = divmod(tp_rank, tp)  # stage 19: tp_rank is pipeline rank x tp size + rank in its tp group
        if tp > 1:  # tp_rank is this process's rank among all of them
            shard = TensorParallelShard(ModelConfig.from_file(resolve_model_path(args.model_path)), tp_local, args.tp_size, args.ep_size)
        if args.pp_size > 1:  # stage 19: only this pipeline rank's layers
            config = ModelConfig.from_file(resolve_model_path(args.model_path))
            layers = layer_partition(config.num_hidden_layers, args.pp_size, args.pp_layer_partition)[pp_rank]
            shard = PipelineShard(config, pp_rank, layers, pp_rank == args.pp_size - 1, shard)
        self.pipeline, self.links = shard if args.pp_size > 1 else None, None  # links: once the group is up
        self.rank, self.tp_size, self.pp_size = tp_rank, tp, args.pp_size
        self.parallel = shard is not None  # a draft model beside a parallel target runs on rank 0 alone
        self.model, self.config, self.model_folder = load_model(args.model_path, device=device, dtype=args.dtype, shard=shard)
        self.dtype = next(self.model.parameters()).dtype
        self.tp_rank = tp_rank
        # Stage 15: the adapter pool, when adapters are served (None otherwise).
        self.lora = make_lora_pool(args, self.model, self.config, device, shard.read_slice if shard else None)
        for layer in self.model.model.layers:  # count routed tokens per expert (load-balance inspection)
            if hasattr(getattr(layer, "mlp", None), "expert_token_counts"):  # (stage 19: other ranks' layers have none)
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
        fingerprint = f"{self.model_folder}|{self.dtype}|{tuple(self.pool.k.shape[::2])}|{args.page_size}|{tp_rank}"
        self.radix_cache = make_prefix_cache(args, self.pool, self.allocator, fingerprint)
        self.hicache = self.radix_cache if isinstance(self.radix_cache, HiRadixCache) else None
        self.use_cuda_graph = not args.disable_cuda_graph and device.type == "cuda" and args.pp_size == 1
        self.cuda_graph_max_bs = args.cuda_graph_max_bs
        self.graphs: CudaGraphRunner | None = None  # set by init_cuda_graphs, once every rank is up
        # The tokens the latest launched step sampled, on the device, and which request each belongs to:
        # the next step's placeholders index into them.
        self.last_sampled: torch.Tensor | None = None
        self.last_sampled_index: dict[int, int] = {}  # request id -> its row of last_sampled

    def connect_pipeline(self, header_group) -> bool:
        """Stage 19: with pipeline ranks, meet this rank's neighbours (once the process group is up)."""
        if self.pipeline is not None:
            self.links = PipelineLinks(self.rank, self.tp_size, self.pp_size, header_group)
        return self.links is not None

    def stop_pipeline(self) -> None:
        """Stage 19: tell the next pipeline rank to stop too, and wait for what this rank sent."""
        if self.links is not None:
            if self.links.next is not None:
                self.links.send_on(None)
            self.links.finish_sends()

    def init_cuda_graphs(self, progress: bool = True) -> None:
        """Record the decode graphs (CUDA only; every rank at the same time, since TP's
        collectives are recorded too). Graphs need the flash kernel: fp32 runs eagerly."""
        if not self.use_cuda_graph or self.dtype not in FLASH_DTYPES or varlen_attn is None:
            return
        graphs = CudaGraphRunner(self.model, self.attention_backend, self.allocator.num_pages,
                                 self.cuda_graph_max_bs, self.config.max_position_embeddings, capture=True,
                                 lora=self.lora)
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
            pages, node = self.radix_cache.match_prefix(request.all_ids[:-1][: request.sampling.reusable_tokens],
                                                        request.lora_path)
            self.radix_cache.lock(node)
        promised = sum(self.expected_pages(r, len(r.page_table), new_token_ratio) for r in running)
        if self.expected_pages(request, len(pages), new_token_ratio) > self.available_pages() - promised or not self.page_tables.free_rows:
            if node is not None:
                self.radix_cache.unlock(node)
            return False
        request.page_table, request.prefix_node, request.shared_pages = list(pages), node, len(pages)
        if self.hicache is not None:
            self.load_back(request, self.expected_pages(request, len(pages), new_token_ratio))
        request.num_cached = request.cached_tokens = request.shared_pages * self.page_size
        self.page_tables.take_row(request)
        return True

    def load_back(self, request: Request, room: int) -> None:
        """Stage 17: where the request's prefix goes on past the device pool, on the host or in
        files, load those pages back (into at most ``room`` new pages, which its admission counted
        as needed anyway) instead of computing them again."""
        tokens = request.all_ids[:-1][: request.sampling.reusable_tokens]
        device_tokens = request.shared_pages * self.page_size
        below = self.hicache.match_tiers(tokens, request.lora_path)[2]
        if below:
            self.hicache.load_back(request.prefix_node, below, room)  # the lock moves down to the loaded end
            pages, node = self.hicache.match_prefix(tokens, request.lora_path)
            request.page_table, request.prefix_node, request.shared_pages = list(pages), node, len(pages)
        self.hicache.record_hit(request.prefix_node, device_tokens)

    def adapter_fits(self, request: Request, running: list[Request]) -> bool:
        """Stage 15: may the request run beside ``running`` without needing more adapters than
        the pool has slots? (Always, without LoRA.)"""
        return self.lora is None or self.lora.fits(request.lora_path, (r.lora_path for r in running))

    def expected_pages(self, request: Request, pages_held: int, new_token_ratio: float) -> int:
        """Pages the request is expected to still need beyond the ``pages_held`` it has."""
        remaining = request.params.max_tokens - request.num_generated
        expected_len = min(request.seq_len + math.ceil(remaining * new_token_ratio), request.max_seq_len)
        return max(self.pages_for(expected_len) - pages_held, 0)

    def peek_cached_length(self, request: Request) -> int:
        """How many tokens of the request the prefix cache holds now (no lock taken)."""
        if self.radix_cache is None:
            return 0
        tokens = request.all_ids[:-1][: request.sampling.reusable_tokens]
        return len(self.radix_cache.match_prefix(tokens, request.lora_path)[0]) * self.page_size

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
        already = self.radix_cache.insert(request.all_ids[: cached_pages * page], table[:cached_pages], request.lora_path) // page
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
        already = self.radix_cache.insert(tokens, request.page_table[:cached_pages], request.lora_path) // page
        self.allocator.free_pages(request.page_table[request.shared_pages : already])  # someone cached these first
        pages, node = self.radix_cache.match_prefix(tokens, request.lora_path)
        self.radix_cache.lock(node)
        self.radix_cache.unlock(request.prefix_node)
        request.page_table[:cached_pages] = pages
        # Entries from the first page that may have changed must reach the device again.
        request.pages_on_device = min(request.pages_on_device, request.shared_pages)
        request.prefix_node, request.shared_pages = node, cached_pages

    def truncate_cache(self, request: Request) -> None:
        """Give back the pages past the request's first ``num_cached`` tokens (rejected guesses' K/V).
        Pages of the prefix cache are never among them: they hold verified tokens only."""
        keep = max(self.pages_for(request.num_cached), request.shared_pages)
        if len(request.page_table) > keep:
            self.allocator.free_pages(request.page_table[keep:])
            del request.page_table[keep:]
            request.pages_on_device = min(request.pages_on_device, keep)

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
        input_ids, positions, seq_rows, seq_lens, complete, verifying = [], [], [], [], [], []
        scored, scored_rows = [], []  # prompt rows to score: (its state, position), batch row
        updates = ([], [], [])  # page-table entries the device has not seen yet
        placeholders = False
        lora_slots, lora_table = [], []  # stage 15: each token's adapter slot, and the pool's slots
        if self.lora is not None and any(r.lora_path is not None for r in requests):
            slots = self.lora.assign([r.lora_path for r in requests])
            lora_slots, lora_table = [s for s, n in zip(slots, new_lengths) for _ in range(n)], self.lora.table()
        for i, (request, n) in enumerate(zip(requests, new_lengths)):
            start, end = request.num_cached, request.num_cached + n
            for position in request.sampling.prompt_rows(start, end):  # prompt log-probabilities asked for
                scored.append((request.sampling, position))
                scored_rows.append(len(input_ids) + position - start)
            self.allocate_cache(request, end)
            known = request.all_ids[start:end]
            if request.draft:  # stage 14: its guesses follow its newest token (-1: padding, fed as token 0)
                known = known + [max(t, 0) for t in request.draft]
            input_ids += known
            if len(known) < n:  # its newest token is pending: the step in flight samples it
                input_ids.append(-1 - self.last_sampled_index[request.id])
                placeholders = True
            positions += range(start, end)
            seq_rows.append(request.table_row)
            seq_lens.append(end)
            self.page_tables.pending_updates(request, *updates)
            request.num_cached = end
            if end == request.seq_len + len(request.draft):
                (verifying if request.draft else complete).append(i)
                request.pending_tokens += 1
        ends = list(itertools.accumulate(new_lengths))
        last_rows = [ends[i] - 1 for i in complete]  # each complete request's last token
        verify_rows = [row for i in verifying for row in range(ends[i] - new_lengths[i], ends[i])]  # every row of a draft
        # Every logits row, in batch order: a one-token prompt chunk that is scored looks like a decode row,
        # and a decode graph returns its rows in batch order.
        rows = sorted(last_rows + scored_rows + verify_rows) if scored or verifying else last_rows
        runs = self.attention_backend.batch_runs(requests, seq_lens, new_lengths)
        batch = ForwardBatch.build(self.device, input_ids, positions, seq_rows, new_lengths, seq_lens, rows, updates, runs,
                                   (lora_slots, lora_table))
        if placeholders:  # in place, on the device: the packed tensor other ranks receive is resolved too
            ids = batch.input_ids
            ids.copy_(torch.where(ids < 0, self.last_sampled[(-1 - ids).clamp(min=0)], ids))
        if self.parallel and tp_group_active():
            broadcast_batch(batch, self.device)  # the other ranks run the same forward on their shards
        trees = [i for i in verifying if requests[i].draft_parents is not None]
        rope_positions, tree_masks = tree_layout(requests, new_lengths, seq_lens, trees, positions, self.device) if trees else (None, None)
        logits = self.forward(batch, rope_positions, tree_masks)
        sample = functools.partial(self._sample, requests, complete, verifying, trees, rows, last_rows, scored,
                                   scored_rows, verify_rows)
        if self.links is not None:  # stage 19: rank 0 of a pipeline; the last rank sends the logits later
            return PipelinedStep(requests, sample, self.links, len(rows), self.config.vocab_size, self.device)
        return sample(logits)

    def _sample(self, requests, complete, verifying, trees, rows, last_rows, scored, scored_rows, verify_rows,
                logits) -> "LaunchedStep":
        """The second half of a launch: score prompts, verify drafts, mask by grammars, sample."""
        verified, tree_tokens, in_place = None, {}, {}
        if scored or verifying:
            # Whose rows are whose: the index lists go over in one copy that does not wait for the forward
            # (indexing with a Python list would). A batch of verifies alone needs no index at all.
            if len(verify_rows) == len(rows):
                drafted, logits = logits, None
            else:
                where = {row: j for j, row in enumerate(rows)}
                drafted_at, scored_at, last_at = copy_to_device(
                    [[where[r] for r in verify_rows], [where[r] for r in scored_rows], [where[r] for r in last_rows]], self.device)
                if scored:
                    self.sampler.record_prompt_logprobs(logits[scored_at], scored)
                drafted, logits = logits[drafted_at], logits[last_at]
            if verifying:
                verifying, verified, tree_tokens, in_place = verify_drafts(requests, verifying, drafted, trees, self.sampler,
                                                                           self.device)
        if complete:
            apply_grammar_masks(logits, [requests[i].grammar for i in complete])
        sampled = self.sampler(logits, [requests[i].sampling for i in complete]) if complete else None
        self.last_sampled = sampled
        self.last_sampled_index = {requests[i].id: j for j, i in enumerate(complete)}
        return LaunchedStep(requests, complete, sampled, verifying, verified, tree_tokens, in_place)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, rope_positions: torch.Tensor | None = None,
                tree_masks: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Run the model on a built batch; logits ``[len(logits_rows), vocab]`` (None if none are wanted).
        Stage 14: draft trees bring their own positions and masks, and run eagerly. Stage 19: a
        pipeline rank after the first gets the hidden states of the rank before in place of
        ``rope_positions`` (positions come with the batch)."""
        self.page_tables.apply(batch.update_rows, batch.update_columns, batch.update_pages)
        if self.links is not None:
            return self._forward_pipeline(batch, rope_positions)
        if self.lora is not None and batch.has_lora and self.tp_rank > 0:  # rank 0 chose the slots; follow it
            self.lora.follow(batch.lora_table.tolist())
        if self.graphs is not None and tree_masks is None and (bucket := self.graphs.bucket(batch)) is not None:
            return self.graphs.run(batch, bucket)  # a decode batch: replay (the graph gives the logits)
        attention = self.attention_backend.prepare(batch, tree_masks)
        if self.lora is not None:
            self.lora.begin(batch.lora_slots if batch.has_lora else None)
        try:
            hidden = self.model(batch.input_ids, batch.positions if rope_positions is None else rope_positions, attention)
        finally:
            if self.lora is not None:
                self.lora.begin(None)
        if batch.logits_rows.numel() == 0:  # only prompt chunks ran: nothing to sample
            return None
        return self.model.compute_logits(hidden[batch.logits_rows])

    def _forward_pipeline(self, batch: ForwardBatch, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """Stage 19: this rank's layers; then the hidden states on to the next rank, or (the last
        rank) the logits back to rank 0."""
        started, links = time.perf_counter(), self.links
        attention = self.attention_backend.prepare(batch, None)
        hidden = self.pipeline.run(self.model, batch.input_ids, hidden, batch.positions, attention)
        if not self.pipeline.last:
            links.timeline.append((f"rank {links.pp_rank}", started, time.perf_counter()))  # (before the send)
            links.send_on(batch, hidden)
            return None
        logits = self.model.compute_logits(hidden[batch.logits_rows]) if batch.logits_rows.numel() else None
        if links.tp_rank == 0:
            links.send_logits(logits, started)
        return logits


class PipelinedStep:
    """Stage 19: a micro-batch rank 0 has sent down the pipeline. ``complete()`` waits for its
    logits from the last rank and samples them, giving the ``LaunchedStep`` a plain launch gives."""

    def __init__(self, requests: list[Request], sample, links: PipelineLinks, rows: int, vocab: int,
                 device: torch.device):
        self.requests, self.sample, self.links = requests, sample, links
        self.rows, self.vocab, self.device = rows, vocab, device

    def complete(self) -> "LaunchedStep":
        return self.sample(self.links.receive_logits(self.rows, self.vocab, self.device))


class LaunchedStep:
    """A step queued on the device. ``tokens()`` waits for it and returns one entry per
    request: the tokens it gained (one sampled token; a verified draft's kept guesses and the
    target's own token after them), or None where only a prompt chunk ran."""

    def __init__(self, requests: list[Request], complete: list[int], sampled: torch.Tensor | None,
                 verifying: list[int] = (), verified: tuple[torch.Tensor, torch.Tensor] | None = None,
                 tree_tokens: dict[int, list[int]] | None = None, in_place: dict[int, int] | None = None):
        self.requests, self.complete, self.verifying = requests, complete, verifying
        # Draft trees are verified on the host: their tokens, and how many kept guesses lie on the chain.
        self.tree_tokens, self.in_place = tree_tokens or {}, in_place or {}
        self.done = None
        if (sampled is not None and sampled.is_cuda) or (verified is not None and verified[0].is_cuda):
            # Start the copy to the host now; reading it later waits for this step only.
            sampled = None if sampled is None else sampled.to("cpu", non_blocking=True)
            verified = None if verified is None else tuple(t.to("cpu", non_blocking=True) for t in verified)
            self.done = torch.cuda.Event()
            self.done.record()
        self.sampled, self.verified = sampled, verified

    def tokens(self) -> list[list[int] | None]:
        if self.done is not None:
            self.done.synchronize()
        next_tokens: list[list[int] | None] = [None] * len(self.requests)
        if self.sampled is not None:
            for i, token in zip(self.complete, self.sampled.tolist()):
                next_tokens[i] = [token]
        if self.verified is not None:
            tokens, accepted = (t.tolist() for t in self.verified)
            for i, row, kept in zip(self.verifying, tokens, accepted):
                next_tokens[i] = row[: kept + 1]
        for i, gained in self.tree_tokens.items():
            next_tokens[i] = gained
        return next_tokens
