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
  packed buffer (``attention_backend.py``), whose length is the total number
  of keys. That length is rounded up to a power of two and is part of the graph's key:
  ``(batch bucket, key bucket)``. Start-up records every batch bucket with
  room for short sequences; a longer key bucket is recorded the first time a
  step needs it;
* **padding rows** must never change a real row: each is a sequence of one
  token whose page-table row (one no request can take) points at a padding
  page that no request owns, so it writes and attends only there;
* **the plan inside the graph**: which slot each new token's K/V goes to and
  which slots each sequence's keys are gathered from are computed *by the
  graph*, from the page tables and the buffers, so a replay redoes them on the
  device. The host copies only the step's token ids, positions, page-table
  rows and lengths (``CudaGraphRunner.run``) and launches one replay;
* **the logits too**: the graph records the lm_head after the last layer,
  writing fp32 logits into one fixed buffer every graph shares (one step runs
  at a time, and its sampler reads them before the next replay is launched).
  So a step's largest GEMM has a recorded shape too: a batch of 233 met
  mid-run costs no first-call set-up, and the lm_head costs no launches of its own.
  Padding rows get logits that nobody reads.

The runner owns what every graph shares (batch buckets, padding rows, the
fixed buffers); the attention backend says what its graphs need: the key of a
batch's graph and the attention recorded in it (``attention_backend.py``).

Prefill and mixed steps, batches above the largest bucket, and dtypes the
flash kernel does not run (fp32) run eagerly, as in stage 08. (SGLang's
``CudaGraphRunner``; vLLM and nano-vllm capture the same way.)
"""

import sys
import time
from typing import NamedTuple

import torch

from .forward_batch import ForwardBatch

MIN_KEY_BUCKET = 1024  # the smallest packed-key buffer a graph is recorded with
START_UP_KEYS_PER_SEQUENCE = 256  # start-up records each batch bucket for sequences this long


def batch_buckets(max_bs: int) -> list[int]:
    """The batch sizes graphs are recorded for: 1, 2, 4, 8, then every 8 up to ``max_bs``."""
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs] + list(range(16, max_bs + 1, 8))
    return sizes if sizes[-1] == max_bs else sizes + [max_bs]


def key_bucket(num_keys: int) -> int:
    """The packed-key buffer length for ``num_keys`` keys: the next power of two (at least MIN_KEY_BUCKET)."""
    return max(MIN_KEY_BUCKET, 1 << (num_keys - 1).bit_length())


class GraphKey(NamedTuple):
    """Which recorded graph a batch replays (``CudaGraphRunner.bucket``)."""

    batch_size: int  # the batch padded up to a recorded size
    keys: int  # the packed-key buffer's length (0 with runs)


class DecodeGraph:
    """One recorded decode forward: ``run()`` replays it and returns its logits ``[bs, vocab]``.

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
                self.logits = forward()

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


class CudaGraphRunner:
    """Records decode forwards per (batch bucket, key bucket) and runs decode batches through them."""

    def __init__(self, model, attention_backend, padding_page: int, max_bs: int, max_context: int, capture: bool):
        self.model, self.backend = model, attention_backend
        pool, page_tables = self.pool, self.page_tables = attention_backend.pool, attention_backend.page_tables
        self.batch_sizes = batch_buckets(max_bs)
        self.max_bs, self.max_context, self.capture = self.batch_sizes[-1], max_context, capture
        self.padding_slot = padding_page * pool.page_size
        # Padding rows read and write through a page-table row taken out of the free list for
        # good, all of whose entries are the padding page (zeroed, so keys read there are finite).
        self.padding_row = page_tables.free_rows.pop(0)
        page_tables.table[self.padding_row] = padding_page
        pool.k[:, self.padding_slot : self.padding_slot + pool.page_size] = 0
        pool.v[:, self.padding_slot : self.padding_slot + pool.page_size] = 0
        device = pool.k.device
        # The fixed input buffers, one column per row of the batch: token id, position,
        # page-table row, sequence length. Columns past a batch's size are padding rows.
        self.inputs = torch.zeros(4, self.max_bs, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.seq_rows, self.seq_lens = self.inputs
        self.padding_inputs = torch.tensor([[0], [0], [self.padding_row], [1]], device=device)  # token 0 at position 0
        # Where every graph writes its logits, one row per batch row (made with the first graph).
        self.logits: torch.Tensor | None = None
        self.graphs: dict[GraphKey, DecodeGraph] = {}
        self.memory_pool = torch.cuda.graph_pool_handle() if capture else None
        self.capture_seconds, self.memory_bytes = 0.0, 0  # recording time; device memory the graphs took
        self.replays = 0  # decode steps run through a graph

    def capture_all(self, progress: bool = True) -> None:
        """Record the start-up graphs the backend names for every batch bucket, largest first
        (smaller graphs then reuse the memory of larger ones in the shared pool)."""
        keys = [key for bs in reversed(self.batch_sizes) for key in self.backend.start_up_keys(bs)]
        for i, key in enumerate(keys):
            self.graph_for(key)
            if progress:
                print(f"\rcapturing CUDA graphs: {i + 1}/{len(keys)} (bs {key.batch_size})", end="", file=sys.stderr)
        if progress:
            print(f" in {self.capture_seconds:.1f} s", file=sys.stderr)

    def bucket(self, batch: ForwardBatch) -> GraphKey | None:
        """The graph key for a batch, or None when it must run eagerly.

        Only pure decode batches qualify: one new token and one logits row per
        sequence, at most ``max_bs`` sequences. The attention backend names the
        graph (or says the batch has none).
        """
        tokens, seqs, logits_rows = batch.sizes.num_tokens, batch.sizes.num_seqs, batch.sizes.num_logits_rows
        if not (tokens == seqs == logits_rows) or seqs > self.max_bs:
            return None
        bs = next(size for size in self.batch_sizes if size >= seqs)
        return self.backend.graph_key(batch, bs)

    def graph_for(self, key: GraphKey) -> DecodeGraph:
        """The graph of this bucket, recorded now if this is its first use."""
        if key not in self.graphs:
            bs = key.batch_size
            start, reserved = time.perf_counter(), self._reserved()
            # Record on padding rows only: valid (if meaningless) inputs, written to the padding page.
            self.inputs[:, :bs] = self.padding_inputs
            attention = self.backend.graph_attention(self, key)
            if self.logits is None:
                self.logits = torch.empty(self.max_bs, self.model.config.vocab_size, dtype=torch.float32,
                                          device=self.pool.k.device)

            def forward():
                attention.begin_step()
                hidden = self.model(self.input_ids[:bs], self.positions[:bs], attention)
                return self.model.compute_logits(hidden, out=self.logits[:bs])

            graph = self.graphs[key] = DecodeGraph(forward, self.capture, self.memory_pool)
            graph.attention = attention  # fills its own inputs before a replay (and can be inspected)
            self.capture_seconds += time.perf_counter() - start
            self.memory_bytes += self._reserved() - reserved
        return self.graphs[key]

    def run(self, batch: ForwardBatch, bucket: GraphKey) -> torch.Tensor:
        """Fill the buffers from ``batch``, replay its bucket's graph; logits ``[B, vocab]``.

        Four copies of the step's small arrays (already on the device) and
        one fill of the padding columns; the graph computes the rest.
        Page-table updates were applied by the caller.
        """
        bs = bucket.batch_size
        graph = self.graph_for(bucket)
        n = batch.sizes.num_seqs
        self.input_ids[:n] = batch.input_ids
        self.positions[:n] = batch.positions
        self.seq_rows[:n] = batch.seq_rows
        self.seq_lens[:n] = batch.seq_lens
        if n < bs:
            self.inputs[:, n:bs] = self.padding_inputs
        graph.attention.fill_inputs(batch)
        self.replays += 1
        return graph.run()[:n]

    def _reserved(self) -> int:
        """Device memory the caching allocator holds, after handing back what it only caches
        (recording a graph empties the cache too, so before/after compare like with like)."""
        if not self.capture:
            return 0
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.pool.k.device)
