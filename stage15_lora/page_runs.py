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
"""

import torch
import torch.nn.functional as F

from common.attention import FLASH_DTYPES

# The flash kernel launches one block row per sequence: a CUDA grid holds at most 65,535 of them.
MAX_VIRTUAL_SEQUENCES = 65_535
# Short runs cost more than the gather saves (H200, 256 sequences of 866 tokens: one-page runs
# 2.95 ms a layer, gathering 0.85 ms; one run each 0.37 ms; ``python -m benchmarks.attention_runs``).
# A decode batch reads runs in place only when its runs hold this many tokens on average.
MIN_TOKENS_PER_RUN = 128


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
