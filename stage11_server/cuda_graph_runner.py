"""Stage 09: decode steps replay captured CUDA graphs.

Why: a decode step of Qwen3-0.6B is ~700 small kernels, each launched from
Python. At small batches the GPU finishes a kernel before Python has launched
the next one, so the step costs what the launches cost, not what the math
costs. A CUDA graph records the kernels of one forward once; replaying it
launches all of them with a single call.

A graph replays *exactly* what it recorded: the same kernels, on the same
memory addresses, with the same shapes. So everything a step changes must be
written into fixed input buffers before the replay, and every shape must be
fixed in advance:

* **batch buckets**: graphs are recorded for batch sizes 1, 2, 4, 8, 16, 24,
  ... up to ``cuda_graph_max_bs``; a batch of 5 runs the graph of 8, with 3
  padding rows;
* **key buckets**: attention gathers the keys of every sequence into one
  packed buffer (``kv_cache.py``), whose length is the total number of keys.
  That length is rounded up to a power of two and is part of the graph's key:
  ``(batch bucket, key bucket)``. Start-up records every batch bucket with
  room for short sequences; a longer key bucket is recorded the first time a
  step needs it;
* **padding rows** must never change a real row: each writes its K/V into a
  padding page that no request owns and attends only to that one key.

The per-step work left on the host is a handful of tensor copies into the
buffers and one replay (``CudaGraphRunner.run``). Prefill and mixed steps, batches above
the largest bucket, and dtypes the flash kernel does not run (fp32) run
eagerly, as in stage 08. (SGLang's ``CudaGraphRunner``; vLLM and nano-vllm
capture the same way.)
"""

import sys
import time

import torch
import torch.nn.functional as F

from .forward_batch import ForwardBatch
from .kv_cache import DevicePageTables, PagedAttention, PagedKVPool

MIN_KEY_BUCKET = 1024  # the smallest packed-key buffer a graph is recorded with
START_UP_KEYS_PER_SEQUENCE = 256  # start-up records each batch bucket for sequences this long


def batch_buckets(max_bs: int) -> list[int]:
    """The batch sizes graphs are recorded for: 1, 2, 4, 8, then every 8 up to ``max_bs``."""
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs] + list(range(16, max_bs + 1, 8))
    return sizes if sizes[-1] == max_bs else sizes + [max_bs]


def key_bucket(num_keys: int) -> int:
    """The packed-key buffer length for ``num_keys`` keys: the next power of two (at least MIN_KEY_BUCKET)."""
    return max(MIN_KEY_BUCKET, 1 << (num_keys - 1).bit_length())


class PackedPlan(PagedAttention):
    """Stage 08's packed attention plan (slots, key offsets, gathered key slots), on any device."""

    packed = True


class StaticAttention(PagedAttention):
    """The attention backend inside a graph: the same calls as ``PagedAttention``,
    reading its plan from the fixed buffers that ``CudaGraphRunner.run`` writes before each replay.

    A batch of one sequence takes another kernel. The flash kernel splits its
    work by sequence and KV head, so one sequence gives an H100 only
    ``kv_heads`` blocks of work for 132 SMs (24 us a layer on Qwen3-0.6B).
    Masked SDPA over the whole key buffer (the memory-efficient kernel, which
    also splits the keys) takes 11 us: the keys past the sequence are masked out.
    """

    def __init__(self, pool: PagedKVPool, slots, cu_seqlens_q, cu_seqlens_k, key_slots, max_k: int):
        self.pool, self.slots, self.key_slots = pool, slots, key_slots
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        self.max_q, self.max_k, self.packed_layout = 1, max_k, True
        self.single_sequence = len(cu_seqlens_q) == 2

    def begin_step(self) -> None:
        """Per-step tensors derived from the buffers; recorded into the graph, so they are redone on every replay."""
        if self.single_sequence:
            self.key_mask = torch.arange(len(self.key_slots), device=self.key_slots.device) < self.cu_seqlens_k[1]

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.single_sequence:
            return super().__call__(layer_index, q, k, v)
        k_pool, v_pool = self.pool.k[layer_index], self.pool.v[layer_index]
        k_pool.index_copy_(0, self.slots, k)
        v_pool.index_copy_(0, self.slots, v)
        # Masked keys still enter the sums with weight 0, so they must be finite: the buffer's
        # unused tail holds slots of earlier steps or the padding slot, all written before.
        keys, values = k_pool[self.key_slots].transpose(0, 1), v_pool[self.key_slots].transpose(0, 1)  # [kv_heads, K, d]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None],
                                             attn_mask=self.key_mask[None, None, None, :], enable_gqa=True)  # [1, heads, 1, d]
        return out[0].transpose(0, 1)


class DecodeGraph:
    """One recorded decode forward: ``run()`` replays it and returns the hidden states ``[bs, hidden]``.

    With ``capture=False`` nothing is recorded and ``run()`` calls the forward
    directly on the same buffers: the CPU tests use this to check everything
    around the graph (buckets, padding, buffer filling).
    """

    def __init__(self, forward, capture: bool, memory_pool=None):
        self.forward = forward
        self.graph = None
        if capture:
            # Warm up first, off the main stream (cuBLAS workspaces, kernel selection), as the
            # PyTorch docs advise; a graph must not record one-time set-up work.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: work of other threads (NCCL's watchdog) does not break the capture.
            with torch.cuda.graph(self.graph, pool=memory_pool, capture_error_mode="thread_local"):
                self.hidden = forward()

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.hidden


class CudaGraphRunner:
    """Records decode forwards per (batch bucket, key bucket) and runs decode batches through them."""

    def __init__(self, model, pool: PagedKVPool, page_tables: DevicePageTables, padding_page: int,
                 max_bs: int, max_context: int, capture: bool):
        self.model, self.pool, self.page_tables = model, pool, page_tables
        self.batch_sizes = batch_buckets(max_bs)
        self.max_bs, self.max_context, self.capture = self.batch_sizes[-1], max_context, capture
        self.padding_slot = padding_page * pool.page_size
        device = pool.k.device
        # The fixed input buffers. Rows past a batch's size are padding.
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.slots = torch.full((self.max_bs,), self.padding_slot, dtype=torch.int64, device=device)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, device=device)  # one query per sequence
        self.cu_seqlens_k = torch.arange(self.max_bs + 1, device=device)
        self.key_slots: dict[int, torch.Tensor] = {}  # key bucket -> packed key slots
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.memory_pool = torch.cuda.graph_pool_handle() if capture else None
        self.capture_seconds, self.memory_bytes = 0.0, 0  # recording time; device memory the graphs took
        self.replays = 0  # decode steps run through a graph

    def capture_all(self, progress: bool = True) -> None:
        """Record every batch bucket for short sequences, largest first (smaller graphs then
        reuse the memory of larger ones in the shared pool)."""
        for i, bs in enumerate(reversed(self.batch_sizes)):
            self.graph_for(bs, key_bucket(bs * START_UP_KEYS_PER_SEQUENCE))
            if progress:
                print(f"\rcapturing CUDA graphs: {i + 1}/{len(self.batch_sizes)} (bs {bs})", end="", file=sys.stderr)
        if progress:
            print(f" in {self.capture_seconds:.1f} s", file=sys.stderr)

    def bucket(self, batch: ForwardBatch) -> tuple[int, int] | None:
        """The graph key for a batch, or None when it must run eagerly.

        Only pure decode batches qualify: one new token and one logits row per
        sequence, at most ``max_bs`` sequences.
        """
        tokens, seqs, logits_rows = batch.header[:3]
        if not (tokens == seqs == logits_rows) or seqs > self.max_bs:
            return None
        bs = next(size for size in self.batch_sizes if size >= seqs)
        return bs, key_bucket(batch.total_keys + bs - seqs)  # each padding row reads one key

    def graph_for(self, bs: int, keys: int) -> DecodeGraph:
        """The graph of this bucket, recorded now if this is its first use."""
        if (bs, keys) not in self.graphs:
            start, reserved = time.perf_counter(), self._reserved()
            if keys not in self.key_slots:
                self.key_slots[keys] = torch.full((keys,), self.padding_slot, dtype=torch.int64, device=self.pool.k.device)
            # Record on padding rows only: valid (if meaningless) inputs, written to the padding page.
            self.slots[:bs] = self.padding_slot
            self.cu_seqlens_k[: bs + 1] = self.cu_seqlens_q[: bs + 1]
            attention = StaticAttention(self.pool, self.slots[:bs], self.cu_seqlens_q[: bs + 1], self.cu_seqlens_k[: bs + 1],
                                        self.key_slots[keys], max_k=min(keys, self.max_context))

            def forward():
                attention.begin_step()
                return self.model(self.input_ids[:bs], self.positions[:bs], attention)

            self.graphs[bs, keys] = DecodeGraph(forward, self.capture, self.memory_pool)
            self.capture_seconds += time.perf_counter() - start
            self.memory_bytes += self._reserved() - reserved
        return self.graphs[bs, keys]

    def run(self, batch: ForwardBatch, bucket: tuple[int, int]) -> torch.Tensor:
        """Fill the buffers from ``batch``, replay its bucket's graph; hidden states ``[B, hidden]``.

        The plan (each new token's slot, each sequence's packed keys) is
        stage 08's, computed eagerly in a few tensor calls; only the copies
        into the fixed buffers are new. Page-table updates were applied by the
        caller.
        """
        bs, keys = bucket
        graph = self.graph_for(bs, keys)
        n, total = batch.header[1], batch.total_keys
        plan = PackedPlan(self.pool, self.page_tables, batch)
        self.input_ids[:n] = batch.input_ids
        self.positions[:n] = batch.positions
        self.slots[:n] = plan.slots
        self.slots[n:bs] = self.padding_slot
        self.cu_seqlens_k[: n + 1] = plan.cu_seqlens_k
        # Padding row j (after the n real ones) owns key total + j: the padding slot, which it
        # has just written itself, so nothing it reads is stale.
        self.cu_seqlens_k[n + 1 : bs + 1] = torch.arange(total + 1, total + bs - n + 1, device=self.cu_seqlens_k.device)
        key_slots = self.key_slots[keys]
        key_slots[:total] = plan.key_slots
        key_slots[total : total + bs - n] = self.padding_slot
        self.replays += 1
        return graph.run()[:n]

    def _reserved(self) -> int:
        """Device memory the caching allocator holds, after handing back what it only caches
        (recording a graph empties the cache too, so before/after compare like with like)."""
        if not self.capture:
            return 0
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.pool.k.device)
