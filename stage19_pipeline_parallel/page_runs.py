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

A batch that feeds a sequence several tokens (a prompt chunk, an extend after
a prefix-cache hit, a batch that mixes these with decode rows) reads in place
too when each of its sequences, cached prefix and new tokens together, is one
run. The kernel aligns its causal mask to the end of each sequence's keys, so
one call over the pool, given each run's start and length, is the gather
path's call without the copy (``ExtendRunAttention``). Other such batches
gather: splitting an extend at its runs and merging, as decode does, cost
more than the copy on an H200 (``benchmarks/results/attention/``).

All of this is one attention backend, ``runs`` (``RunsBackend``, at the end
of this file; ``attention_backend.py`` says what a backend is).
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


def flash_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q: int, max_k: int, causal: bool,
                   seqused_k: torch.Tensor | None = None):
    """The flash kernel over packed sequences, in place: ``(out [Tq, heads, d], lse [Tq, heads])``.

    With ``seqused_k``, sequence ``i``'s keys are ``k[cu_seqlens_k[i] : cu_seqlens_k[i] + seqused_k[i]]``
    (only the starts are read), so ``k`` can be a whole pool. ``k`` may have fewer heads than ``q``:
    each KV head serves its group of query heads. A sequence with no keys gets a zero output
    and ``lse`` +inf (flash-attn's convention), which would outweigh every other part: the
    merge must drop it."""
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 0.0, causal, False, seqused_k=seqused_k)[:2]
    return out, lse.t()  # the kernel gives lse as [heads, Tq]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False):
    """One run's attention with plain matmuls (the reference; fp32 at least, as the kernel
    accumulates): ``q [n, heads, d]`` over all of ``k, v [L, kv_heads, d]`` -> ``(out [n, heads, d], lse [n, heads])``.
    ``causal``: query ``i`` sees the keys up to ``L - n + i`` (the kernel's mask, aligned to the end)."""
    heads, dim = q.shape[1:]
    wide = torch.promote_types(q.dtype, torch.float32)
    groups = heads // k.shape[1]
    q = q.transpose(0, 1).to(wide)  # [heads, n, d]
    k, v = (t.repeat_interleave(groups, dim=1).transpose(0, 1).to(wide) for t in (k, v))  # [heads, L, d]
    scores = q @ k.transpose(1, 2) * dim**-0.5  # [heads, n, L]
    if causal:
        n, length = scores.shape[1:]
        scores = scores.masked_fill(torch.ones(n, length, dtype=torch.bool, device=scores.device).triu(length - n + 1),
                                    float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1)
    return out, scores.logsumexp(-1).t()


def packed_attention_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q: int, max_k: int, causal: bool,
                              seqused_k: torch.Tensor):
    """``flash_with_lse`` with keys read in place (sequence ``i``'s are ``k[cu_seqlens_k[i] :
    cu_seqlens_k[i] + seqused_k[i]]``), and elsewhere (CPU, fp32) the reference, one sequence at a time."""
    if q.is_cuda and q.dtype in FLASH_DTYPES:
        return flash_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, seqused_k=seqused_k)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    bounds = cu_seqlens_q.tolist()
    for i, (start, length) in enumerate(zip(cu_seqlens_k.tolist(), seqused_k.tolist())):
        rows = slice(bounds[i], bounds[i + 1])
        out[rows], lse[rows] = attention_with_lse(q[rows], k[start : start + length], v[start : start + length], causal)
    return out, lse


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
        return flash_with_lse(rows, k_pool, v_pool, self.cu_seqlens_q, self.cu_seqlens_k, groups, self.max_run_len,
                              causal=False, seqused_k=self.seqused_k)

    def _reference(self, rows: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, groups: int):
        """The same per-run results, one run at a time with plain matmuls (CPU, fp32)."""
        out = torch.zeros_like(rows)
        wide = torch.promote_types(rows.dtype, torch.float32)
        lse = torch.full(rows.shape[:2], float("inf"), dtype=wide, device=rows.device)  # empty runs: as the kernel
        starts, lens = self.run_starts.tolist(), self.run_lens.tolist()
        for i, (start, length) in enumerate(zip(starts, lens)):
            if length:  # run i's query rows [G, KVH, d] over its keys [L, KVH, d]
                run = slice(i * groups, (i + 1) * groups)
                out[run], lse[run] = attention_with_lse(rows[run], k_pool[start : start + length],
                                                        v_pool[start : start + length])
        return out, lse


def merge_runs(out: torch.Tensor, lse: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Combine per-run attention ``out [B, R, ..., d]`` by the runs' ``lse [B, R, ...]`` -> ``[B, ..., d]``.

    Each run's weight is ``exp(lse_r - lse)``: a softmax over the run axis.
    Empty runs (``empty``, broadcast over ``lse``) get weight 0.
    """
    wide = torch.promote_types(out.dtype, torch.float32)
    weights = lse.to(wide).masked_fill(empty, float("-inf")).softmax(dim=1)
    return (out.to(wide) * weights[..., None]).sum(dim=1).to(out.dtype)


class ExtendRunAttention:
    """Causal attention for sequences that feed several new tokens, each sequence's keys one run of the pool.

    Sequence ``b`` feeds queries ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of
    ``q [T, heads, d]``, its newest tokens; all of its keys, the cached prefix
    and this step's (already written), are the pool slots ``run_starts[b]``
    onwards, ``run_lens[b]`` of them. The flash kernel aligns the causal mask to
    the end of each sequence's keys, so the last of ``n`` queries sees all
    ``run_lens[b]`` keys and the first ``run_lens[b] - n + 1``: one call, the
    gather path's, minus the copy.
    """

    def __init__(self, new_lengths: torch.Tensor, run_starts: torch.Tensor, run_lens: torch.Tensor,
                 max_new_length: int, max_run_len: int):
        self.max_q, self.max_k = max_new_length, max_run_len
        self.cu_seqlens_q = F.pad(new_lengths.cumsum(0), (1, 0)).int()
        self.cu_seqlens_k = F.pad(run_starts.int(), (0, 1))  # with lengths given, only the starts are read
        self.seqused_k = run_lens.int()

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """``q [T, heads, d]`` against one layer's whole pool ``[slots, kv_heads, d]`` -> ``[T, heads, d]``."""
        return packed_attention_with_lse(q, k_pool, v_pool, self.cu_seqlens_q, self.cu_seqlens_k, self.max_q, self.max_k,
                                         True, self.seqused_k)[0]


@register_backend("runs")
class RunsBackend(GatherBackend):
    """Stage 12's attention backend: a decode batch reads each sequence's keys where they lie,
    run by run (``PageRunsAttention``); a batch with prompt chunks or extends does when each of
    its sequences is one run (``PageRunsExtend``), and gathers as stage 11 does otherwise."""

    def batch_runs(self, requests, seq_lens: list[int], new_lengths: list[int]) -> tuple[int, list[int], list[int]]:
        """Where each sequence of a batch has its keys: its page runs as pool slot ranges, padded
        with empty runs to the same count. Returns no runs (the gather path) when the runs are too
        short to pay or too many for the kernel, and for a batch that feeds a sequence several
        tokens unless every sequence is one run. One run per sequence always pays: the same
        kernel over the same sequences, minus the copy."""
        tables, page_size = self.page_tables.runs, self.pool.page_size
        runs = pack_runs([token_runs(tables[r.table_row], n, page_size) for r, n in zip(requests, seq_lens)])
        if max(new_lengths) != 1:
            return runs if runs[0] == 1 else NO_RUNS
        slots = len(runs[1])
        too_short = runs[0] > 1 and sum(seq_lens) < MIN_TOKENS_PER_RUN * slots
        return NO_RUNS if too_short or slots > MAX_VIRTUAL_SEQUENCES else runs

    def prepare(self, batch, tree_masks: dict | None = None):
        if not batch.sizes.runs_per_seq or tree_masks:  # stage 14: draft trees attend through their masks
            return super().prepare(batch, tree_masks)
        if batch.sizes.max_new_length > 1:
            return PageRunsExtend(self.pool, self.page_tables.table, batch)
        attention = PageRunsAttention(self.pool, self.page_tables.table, batch.seq_rows, batch.seq_lens,
                                      batch.run_starts, batch.run_lens, batch.sizes.max_run_len)
        attention.begin_step()
        return attention

    def start_up_keys(self, bs: int) -> list[GraphKey]:
        # One run per sequence is what the allocator aims for; two is what many sequences come to
        # once finished requests have scattered the free pages. Recorded only when first needed,
        # nano-vllm's 256 requests met a two-run graph of each batch bucket as the batch shrank,
        # each a step 36-120 ms long on an H100 (recording them at start-up: +1.5-2% tok/s).
        return [GraphKey(bs, 0, 1), GraphKey(bs, 0, 2)] if bs > 1 else super().start_up_keys(bs)

    def graph_key(self, batch, bs: int) -> GraphKey | None:
        runs_per_seq = batch.sizes.runs_per_seq
        if not runs_per_seq or bs == 1:  # one sequence keeps the gather graph (see cuda_graph_runner.py)
            return super().graph_key(batch, bs)
        if batch.sizes.max_new_length > 1:  # stage 14: a verify batch, each sequence one run
            return GraphKey(bs, 0, 1, batch.sizes.max_new_length)
        return GraphKey(bs, 0, runs_per_seq) if runs_per_seq <= MAX_RUNS_PER_SEQ else None

    def graph_attention(self, graphs, key: GraphKey):
        if not key.runs_per_seq:
            return super().graph_attention(graphs, key)
        bs = key.batch_size
        if key.width > 1:
            return VerifyRunsGraphAttention(self.pool, bs, key.width, graphs.max_context, graphs.padding_slot)
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


class PageRunsExtend:
    """The ``runs`` backend's attention for a batch with prompt chunks or extends, each sequence
    one run: the new tokens' K/V are written to their slots, then every layer attends over the
    runs in place (``ExtendRunAttention``). Eager; a verify graph uses ``VerifyRunsGraphAttention``."""

    def __init__(self, pool, table: torch.Tensor, batch):
        self.pool, page = pool, pool.page_size
        token_rows = batch.seq_rows.repeat_interleave(batch.new_lengths, output_size=batch.sizes.num_tokens)
        self.slots = table[token_rows, batch.positions // page] * page + batch.positions % page
        self.attention = ExtendRunAttention(batch.new_lengths, batch.run_starts, batch.run_lens,
                                            batch.sizes.max_new_length, batch.sizes.max_run_len)

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.pool.k[layer_index], self.pool.v[layer_index]
        k_pool.index_copy_(0, self.slots, k)
        v_pool.index_copy_(0, self.slots, v)
        return self.attention(q, k_pool, v_pool)


class VerifyRunAttention:
    """A verify's attention when every sequence feeds ``width`` tokens and is one run of the pool
    (its new tokens, already written, the run's last ``width`` slots), planned once per step.

    One causal call over the runs (``ExtendRunAttention``) reads every key once per *query
    head*: the kernel lets the query heads of a KV head share its keys only when a sequence has
    one query (a decode step). So the verify splits each sequence's keys in two:

    * the **cached prefix**, which every new token sees whole: one non-causal call in which a
      sequence's ``group x width`` (query head, new token) pairs of a KV head are that head's
      query rows, so each key is read once, as in a decode step;
    * its **new tokens**, seen causally: a small causal call per (sequence, query head);

    and merges the two by their log-sum-exps, as decode merges runs: the prefix's share of a
    row's softmax mass is ``sigmoid(lse_prefix - lse_new)``.
    """

    def __init__(self, run_starts: torch.Tensor, run_lens: torch.Tensor, width: int, max_run_len: int):
        self.batch_size, self.width, self.max_run_len = len(run_starts), width, max_run_len
        # The prefix: every run but its last `width` slots (a padding row's is empty: it reads its own first slot).
        self.prefix_starts = F.pad(run_starts.int(), (0, 1))  # with lengths given, only the starts are read
        self.prefix_lens = (run_lens - width).clamp(min=1).int()
        self.first_new = (run_starts + run_lens - width).int()  # each sequence's new tokens
        self.groups = None  # the rest of the plan needs the query heads: made by the first layer

    def plan(self, groups: int, device: torch.device) -> None:
        """Sequence ``b``'s query rows for a KV head are its ``(h, i)`` pairs, ``b``-major, then ``h``."""
        rows, width = self.batch_size * groups * self.width, self.width
        self.groups = groups
        self.prefix_rows = torch.arange(0, rows + 1, groups * width, dtype=torch.int32, device=device)
        self.new_rows = torch.arange(0, rows + 1, width, dtype=torch.int32, device=device)
        self.new_starts = F.pad(self.first_new.repeat_interleave(groups), (0, 1))  # each query head reads them
        self.new_lens = torch.full((self.batch_size * groups,), width, dtype=torch.int32, device=device)

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """``q [B * width, heads, d]`` against one layer's whole pool ``[slots, kv_heads, d]`` -> ``[B * width, heads, d]``."""
        heads, dim = q.shape[1:]
        batch, width, kv_heads = self.batch_size, self.width, k_pool.shape[1]
        if self.groups is None:
            self.plan(heads // kv_heads, q.device)
        groups = self.groups
        # [B, width, KVH, G, d] -> [B, G, width, KVH, d]: a KV head's query rows, sequence by sequence.
        rows = q.view(batch, width, kv_heads, groups, dim).permute(0, 3, 1, 2, 4).reshape(-1, kv_heads, dim)
        out_prefix, lse_prefix = packed_attention_with_lse(rows, k_pool, v_pool, self.prefix_rows, self.prefix_starts,
                                                           groups * width, self.max_run_len, False, self.prefix_lens)
        out_new, lse_new = packed_attention_with_lse(rows, k_pool, v_pool, self.new_rows, self.new_starts, width, width,
                                                     True, self.new_lens)
        weight = torch.sigmoid(lse_prefix - lse_new)[..., None]  # the prefix's share of each row's softmax
        out = torch.lerp(out_new.float(), out_prefix.float(), weight)  # [B * G * width, KVH, d]
        merged = torch.empty_like(q)  # back to [B, width, KVH, G, d], in the query's dtype
        merged.view(batch, width, kv_heads, groups, dim).copy_(out.view(batch, groups, width, kv_heads, dim).permute(0, 2, 3, 1, 4))
        return merged


class VerifyRunsGraphAttention(PageRunsExtend):
    """Stage 14: a verify graph's attention over runs. Every sequence feeds ``width`` tokens and is
    one run of the pool, its new tokens the run's last ``width`` slots: ``VerifyRunAttention``.

    The graph owns the run buffers; ``fill_inputs`` copies a batch's runs in before a replay,
    and a padding row is a run of ``width`` slots on the padding page (where its tokens go).
    Writing and attending is ``PageRunsExtend``'s; only the plan comes from the buffers.
    """

    def __init__(self, pool, bs: int, width: int, max_context: int, padding_slot: int):
        self.pool, self.width, self.padding_slot = pool, width, padding_slot
        self.run_starts, self.run_lens = torch.zeros(2, bs, dtype=torch.int64, device=pool.k.device)
        self.newest = torch.arange(width, device=pool.k.device) - width  # offsets from a run's end
        self.max_context = max_context
        self.pad_rows(0)

    def begin_step(self) -> None:
        """Recorded with the forward: the new tokens' slots and the step's plan, from the buffers."""
        self.slots = ((self.run_starts + self.run_lens)[:, None] + self.newest).flatten()
        self.attention = VerifyRunAttention(self.run_starts, self.run_lens, self.width, self.max_context)

    def fill_inputs(self, batch) -> None:
        n = batch.sizes.num_seqs
        self.run_starts[:n] = batch.run_starts
        self.run_lens[:n] = batch.run_lens
        if n < len(self.run_starts):
            self.pad_rows(n)

    def pad_rows(self, first: int) -> None:
        self.run_starts[first:], self.run_lens[first:] = self.padding_slot, self.width
