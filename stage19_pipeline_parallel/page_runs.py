"""Stage 12: decode attention reads each sequence's keys where they lie in the KV pool.

Stages 02-11 attend in two moves: copy every sequence's keys and values out of
their pages into one packed buffer, then run the flash kernel over the copy.
In a large decode step that copy is most of the GPU's work: it reads every key
once, writes it once, and the kernel reads it again.

A page table is mostly made of *runs*: consecutive page ids ``p, p+1, ...,
p+n-1``. The pool is flat over slots (slot = page * page_size + offset), so a
run's tokens sit end to end in it, and the flash kernel can read them in
place: handed the whole pool, a start ``cu_seqlens_k[i]`` and a length
``seqused_k[i]``, its sequence ``i`` is ``pool[start : start + length]``. So
each run of a request becomes one *virtual sequence* of the kernel; all of a
request's runs share its query; and their partial results are merged exactly:

    lse = log(sum_r exp(lse_r))
    out = sum_r exp(lse_r - lse) * out_r

where ``out_r`` is the softmax attention over run ``r``'s keys alone and
``lse_r`` the log of that softmax's denominator (the log-sum-exp of the run's
scores). Softmax over all the keys is this weighted mix of softmaxes over any
split of them: the combine step of flash-decoding. A request whose pages are
one run needs no merge at all, which is why the allocator
(``page_allocator.py``) keeps runs long.

Rows are padded to the same number of *runs per sequence* (a power of two, so CUDA
graphs see few shapes); an empty run has length 0 and weight 0.

On the CPU (and in fp32) a reference loop computes the same per-run results
with plain matmuls, so the CPU tests run the lesson's math.

All of this is one attention backend, ``runs`` (``RunsBackend``, at the end
of this file; ``attention_backend.py`` says what a backend is): decode
batches read their runs in place, every other batch gathers its keys as the
``gather`` backend does.
"""

import torch
import torch.nn.functional as F

from common.attention import FLASH_DTYPES

from .attention_backend import GatherBackend, register_backend
from .cuda_graph_runner import GraphKey

# The flash kernel launches one block row per sequence: a CUDA grid holds at most 65,535 of them.
MAX_VIRTUAL_SEQUENCES = 65_535
# Short runs cost more than the gather saves (H200, 256 sequences of 866 tokens: one-page runs
# 2.95 ms a layer, gathering 0.85 ms; one run each 0.37 ms; ``python -m benchmarks.attention_runs``).
# A decode batch reads runs in place only when its runs hold this many tokens on average.
MIN_TOKENS_PER_RUN = 128
MAX_RUNS_PER_SEQ = 64  # the most runs per sequence a CUDA graph is recorded for; more run eagerly
NO_RUNS = (0, [], [])  # a batch that gathers its keys: no runs per sequence


def extend_runs(runs: list[list[int]], pages: list[int]) -> None:
    """Append ``pages`` to a page table's runs ``[[first page, page count], ...]``, in place."""
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1][1] += 1
        else:
            runs.append([page, 1])


def truncate_runs(runs: list[list[int]], num_pages: int) -> None:
    """Keep only the runs of the first ``num_pages`` pages, in place."""
    total = sum(count for _, count in runs)
    while total > num_pages:
        cut = min(runs[-1][1], total - num_pages)
        runs[-1][1] -= cut
        total -= cut
        if runs[-1][1] == 0:
            runs.pop()


def token_runs(runs: list[list[int]], seq_len: int, page_size: int) -> list[tuple[int, int]]:
    """The slot ranges that hold a sequence's first ``seq_len`` tokens: ``[(first slot, tokens), ...]``."""
    ranges, covered = [], 0
    for first, count in runs:
        if covered >= seq_len:
            break
        tokens = min(count * page_size, seq_len - covered)
        ranges.append((first * page_size, tokens))
        covered += tokens
    return ranges


def runs_per_seq(num_runs: int) -> int:
    """Runs per sequence for a batch whose longest run list has ``num_runs``: a power of two."""
    return 1 << (num_runs - 1).bit_length()


def pack_runs(ranges: list[list[tuple[int, int]]]) -> tuple[int, list[int], list[int]]:
    """Every sequence's slot ranges, padded with empty runs to the same count, laid end to end:
    (runs per sequence, run starts, run lengths), as a ``ForwardBatch`` carries them."""
    per_seq = runs_per_seq(max(map(len, ranges)))
    starts, lens = [], []
    for sequence in ranges:
        empty = [0] * (per_seq - len(sequence))
        starts += [start for start, _ in sequence] + empty
        lens += [length for _, length in sequence] + empty
    return per_seq, starts, lens


class RunAttention:
    """Decode attention over page runs for one step: planned once, called for every layer.

    ``run_starts`` / ``run_lens`` ``[B * R]``: sequence ``b``'s ``r``-th run is
    the pool slots ``run_starts[b * R + r]`` onwards, ``run_lens[b * R + r]`` of
    them (0 for an empty run). ``max_run_len`` bounds every run (a host int).
    """

    def __init__(self, run_starts: torch.Tensor, run_lens: torch.Tensor, batch_size: int, max_run_len: int):
        self.batch_size, self.runs_per_seq = batch_size, run_lens.numel() // batch_size
        self.max_run_len = max_run_len
        self.run_starts, self.run_lens = run_starts, run_lens
        # What the flash kernel takes: int32 offsets, one more than there are sequences (with
        # seqused_k given, only the starts are read), and each sequence's length.
        self.cu_seqlens_k = F.pad(run_starts.int(), (0, 1))
        self.seqused_k = run_lens.int()
        self.empty = (run_lens == 0).view(batch_size, self.runs_per_seq, 1, 1)
        self.cu_seqlens_q = None  # made at the first layer, once the query groups are known

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """``q [B, heads, d]`` against one layer's whole pool ``[slots, kv_heads, d]`` -> ``[B, heads, d]``."""
        batch, heads, dim = q.shape
        kv_heads = k_pool.shape[1]
        groups = heads // kv_heads
        # Query heads that share a KV head become `groups` query rows of that one head, so the
        # kernel reads each key once; every run of a sequence gets a copy of the sequence's rows.
        rows = q.view(batch, kv_heads, groups, dim).transpose(1, 2)  # [B, G, KVH, d]
        rows = rows[:, None].expand(batch, self.runs_per_seq, groups, kv_heads, dim).reshape(-1, kv_heads, dim)
        if q.is_cuda and q.dtype in FLASH_DTYPES:
            out, lse = self._flash(rows, k_pool, v_pool, groups)
        else:
            out, lse = self._reference(rows, k_pool, v_pool, groups)
        out = out.view(batch, self.runs_per_seq, groups, kv_heads, dim)
        if self.runs_per_seq > 1:
            out = merge_runs(out, lse.view(batch, self.runs_per_seq, groups, kv_heads), self.empty)
        else:
            out = out[:, 0]  # one run: the kernel's answer is the answer
        return out.transpose(1, 2).reshape(batch, heads, dim)  # [B, G, KVH, d] -> [B, KVH * G, d]

    def _flash(self, rows: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, groups: int):
        """Every run in one flash call, its keys read in place; returns outputs and ``lse [rows, kv_heads]``."""
        if self.cu_seqlens_q is None:
            self.cu_seqlens_q = torch.arange(0, rows.shape[0] + 1, groups, dtype=torch.int32, device=rows.device)
        out, lse = torch.ops.aten._flash_attention_forward(
            rows, k_pool, v_pool, self.cu_seqlens_q, self.cu_seqlens_k, groups, self.max_run_len,
            0.0, False, False, seqused_k=self.seqused_k,
        )[:2]
        return out, lse.t()  # the kernel gives lse as [kv_heads, rows]

    def _reference(self, rows: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, groups: int):
        """The same per-run results, one run at a time with plain matmuls (CPU, fp32)."""
        kv_heads, dim = k_pool.shape[1:]
        wide = torch.promote_types(rows.dtype, torch.float32)  # fp32 at least, as the kernel accumulates
        out = torch.zeros_like(rows)
        lse = torch.full((rows.shape[0], kv_heads), float("-inf"), dtype=wide, device=rows.device)
        starts, lens = self.run_starts.tolist(), self.run_lens.tolist()
        for i, (start, length) in enumerate(zip(starts, lens)):
            if length == 0:
                continue
            q = rows[i * groups : (i + 1) * groups].transpose(0, 1).to(wide)  # [KVH, G, d]
            k = k_pool[start : start + length].transpose(0, 1).to(wide)  # [KVH, L, d]
            v = v_pool[start : start + length].transpose(0, 1).to(wide)
            scores = q @ k.transpose(1, 2) * dim**-0.5  # [KVH, G, L]
            out[i * groups : (i + 1) * groups] = (scores.softmax(-1) @ v).transpose(0, 1).to(rows.dtype)
            lse[i * groups : (i + 1) * groups] = scores.logsumexp(-1).t()
        return out, lse


def merge_runs(out: torch.Tensor, lse: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Combine per-run attention ``out [B, R, ..., d]`` by the runs' ``lse [B, R, ...]`` -> ``[B, ..., d]``.

    Each run's weight is ``exp(lse_r - lse)``: a softmax over the run axis.
    Empty runs (``empty``, broadcast over ``lse``) get weight 0.
    """
    wide = torch.promote_types(out.dtype, torch.float32)
    weights = lse.to(wide).masked_fill(empty, float("-inf")).softmax(dim=1)
    return (out.to(wide) * weights[..., None]).sum(dim=1).to(out.dtype)


@register_backend("runs")
class RunsBackend(GatherBackend):
    """Stage 12's attention backend: a decode batch reads each sequence's keys where they lie,
    run by run (``PageRunsAttention``); prompts and mixed batches gather as stage 11 does."""

    def batch_runs(self, requests, seq_lens: list[int], new_lengths: list[int]) -> tuple[int, list[int], list[int]]:
        """Where each sequence of a decode batch has its keys: its page runs as pool slot ranges,
        padded with empty runs to the same count. Returns no runs (the gather path) for other
        batches, and when the runs are too short to pay or too many for the kernel. One run per
        sequence always pays: the same kernel over the same sequences, minus the copy."""
        if max(new_lengths) != 1:
            return NO_RUNS
        tables, page_size = self.page_tables.runs, self.pool.page_size
        runs = pack_runs([token_runs(tables[r.table_row], n, page_size) for r, n in zip(requests, seq_lens)])
        slots = len(runs[1])
        too_short = runs[0] > 1 and sum(seq_lens) < MIN_TOKENS_PER_RUN * slots
        return NO_RUNS if too_short or slots > MAX_VIRTUAL_SEQUENCES else runs

    def prepare(self, batch, tree_masks: dict | None = None):
        if not batch.sizes.runs_per_seq:
            return super().prepare(batch, tree_masks)
        attention = PageRunsAttention(self.pool, self.page_tables.table, batch.seq_rows, batch.seq_lens,
                                      batch.run_starts, batch.run_lens, batch.sizes.max_run_len)
        attention.begin_step()
        return attention

    def start_up_key(self, bs: int) -> GraphKey:
        return GraphKey(bs, 0, 1) if bs > 1 else super().start_up_key(bs)

    def graph_key(self, batch, bs: int) -> GraphKey | None:
        runs_per_seq = batch.sizes.runs_per_seq
        if not runs_per_seq or bs == 1:  # one sequence keeps the gather graph (see cuda_graph_runner.py)
            return super().graph_key(batch, bs)
        return GraphKey(bs, 0, runs_per_seq) if runs_per_seq <= MAX_RUNS_PER_SEQ else None

    def graph_attention(self, graphs, key: GraphKey):
        if not key.runs_per_seq:
            return super().graph_attention(graphs, key)
        bs = key.batch_size
        # The graph's own run buffers, filled before each replay; recorded on padding rows.
        starts, lens = torch.zeros(2, bs * key.runs_per_seq, dtype=torch.int64, device=graphs.seq_rows.device)
        attention = PageRunsAttention(self.pool, self.page_tables.table, graphs.seq_rows[:bs], graphs.seq_lens[:bs],
                                      starts, lens, max_run_len=graphs.max_context, padding_slot=graphs.padding_slot)
        attention.pad_rows(0)
        return attention


class PageRunsAttention:
    """The ``runs`` backend's attention for one decode forward: each sequence's new K/V is
    written after its last key, then every layer attends over the runs in place (``RunAttention``).

    ``begin_step`` finds the slot of each new token (from the page table) and plans the runs.
    Inside a CUDA graph it is recorded with the forward, so a replay redoes it; the runs then
    come from buffers the graph owns, which ``fill_inputs`` fills before each replay.
    """

    def __init__(self, pool, table: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor,
                 run_starts: torch.Tensor, run_lens: torch.Tensor, max_run_len: int, padding_slot: int = 0):
        self.pool, self.table, self.rows, self.seq_lens = pool, table, rows, seq_lens
        self.run_starts, self.run_lens, self.max_run_len = run_starts, run_lens, max_run_len
        self.runs_per_seq, self.padding_slot = run_lens.numel() // len(rows), padding_slot

    def begin_step(self) -> None:
        page, position = self.pool.page_size, self.seq_lens - 1  # a decode token is its sequence's last
        self.slots = self.table[self.rows, position // page] * page + position % page
        self.runs = RunAttention(self.run_starts, self.run_lens, len(self.rows), self.max_run_len)

    def fill_inputs(self, batch) -> None:
        """Copy the batch's runs into the graph's buffers; the rows past it are padding."""
        count = batch.sizes.num_seqs * self.runs_per_seq
        self.run_starts[:count] = batch.run_starts
        self.run_lens[:count] = batch.run_lens
        if batch.sizes.num_seqs < len(self.rows):
            self.pad_rows(batch.sizes.num_seqs)

    def pad_rows(self, first: int) -> None:
        """Rows ``first ..`` are padding: one run of one key at the padding slot, then empty runs."""
        starts = self.run_starts.view(len(self.rows), self.runs_per_seq)[first:]
        lens = self.run_lens.view(len(self.rows), self.runs_per_seq)[first:]
        lens.zero_()
        starts[:, 0], lens[:, 0] = self.padding_slot, 1

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.pool.k[layer_index], self.pool.v[layer_index]
        k_pool.index_copy_(0, self.slots, k)
        v_pool.index_copy_(0, self.slots, v)
        return self.runs(q, k_pool, v_pool)
