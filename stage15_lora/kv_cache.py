"""Stage 02's KV cache: one preallocated pool of pages shared by all requests.

Per layer, keys and values live in ``[num_pages, page_size, kv_heads, head_dim]``
tensors allocated once from a memory budget. A request's tokens are scattered
over pages listed in its page table (see ``page_allocator.py``); attention
gathers them back in order. The pool, not any request's maximum length,
bounds how many tokens can be cached.

Three pieces:

* ``PagedKVPool``: the keys and values themselves;
* ``DevicePageTables``: every running request's page table, kept on the
  device and updated a few entries at a time, so a step never re-sends them;
* ``PagedAttention``: the attention backend of one forward, which writes the
  new K/V into the pool and attends each sequence over its pages.

Stage 12: the device page tables also keep each row's pages as runs of
consecutive ids, and a decode batch attends over those runs in place
(``page_runs.py``) instead of gathering its keys.
"""

import torch
import torch.nn.functional as F

from common.attention import causal_attention, varlen_attention
from common.config import ModelConfig

from .page_runs import RunAttention, extend_runs, truncate_runs


class PagedKVPool:
    """Keys and values of every cached token: ``[layers, num_pages * page_size, kv_heads, head_dim]``.

    Stored flat over slots (slot = page * page_size + offset) so writes are
    one ``index_copy_`` per layer.
    """

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype):
        self.num_pages, self.page_size = num_pages, page_size
        shape = (config.num_hidden_layers, num_pages * page_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        """K and V of ``page_size`` tokens in every layer."""
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
        return per_token * page_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class DevicePageTables:
    """The page tables of running requests, on the device: ``table[row, i]`` is the page
    holding tokens ``i * page_size ..`` of the request that owns ``row``.

    This is SGLang's ReqToTokenPool kept per page (vLLM calls it the block
    table). The host still owns the truth (each request's ``page_table`` list,
    the allocator, the prefix cache); a request takes a row when it is
    admitted, and each step sends only the entries that changed since the
    step before (``pending_updates``): a new page every ``page_size`` tokens.
    ``runs[row]`` is the same row read as runs of consecutive pages
    (``page_runs.py``), kept up to date by the same updates.
    """

    def __init__(self, max_requests: int, max_pages_per_request: int, device: torch.device):
        self.table = torch.zeros(max_requests, max_pages_per_request, dtype=torch.int64, device=device)
        self.free_rows = list(range(max_requests - 1, -1, -1))  # pop() hands out low rows first
        self.runs: list[list[list[int]]] = [[] for _ in range(max_requests)]

    def take_row(self, request) -> None:
        request.table_row, request.pages_on_device = self.free_rows.pop(), 0
        self.runs[request.table_row] = []

    def release_row(self, request) -> None:
        if request.table_row is not None:
            self.free_rows.append(request.table_row)
            request.table_row, request.pages_on_device = None, 0

    def pending_updates(self, request, rows: list[int], columns: list[int], pages: list[int]) -> None:
        """Append the (row, column, page) entries the device copy of this request's table lacks,
        and bring the row's runs up to date."""
        new = request.page_table[request.pages_on_device :]
        rows += [request.table_row] * len(new)
        columns += range(request.pages_on_device, len(request.page_table))
        pages += new
        runs = self.runs[request.table_row]
        truncate_runs(runs, request.pages_on_device)  # entries from there on may have changed
        extend_runs(runs, new)
        request.pages_on_device = len(request.page_table)

    def apply(self, rows: torch.Tensor, columns: torch.Tensor, pages: torch.Tensor) -> None:
        self.table[rows, columns] = pages


class PagedAttention:
    """The attention backend for one forward over a batch, reading K/V through page tables.

    Sequence ``i`` feeds its next ``new_lengths[i]`` tokens (its positions
    ``seq_lens[i] - new_lengths[i] ..``) and attends over its first
    ``seq_lens[i]`` tokens. Batches may mix one-token decodes and prompts.

    A decode batch that carries page runs (stage 12's ``runs`` backend) reads
    every key where it lies: ``RunAttention``, on any device. Otherwise, on
    CUDA every sequence's keys are gathered from their pages into one
    packed buffer and a single flash ``varlen_attention`` call attends the
    whole batch. On the CPU the decode rows share one padded SDPA call (keys
    padded to the longest, padding masked out) and each prompt is attended on
    its own. ``packed`` forces the CUDA layout on the CPU (tests use it).
    """

    packed: bool | None = None  # None: packed on CUDA, padded/per-sequence on the CPU
    runs: RunAttention | None = None  # a decode batch's page runs, when it carries them

    def __init__(self, pool: PagedKVPool, tables: DevicePageTables, batch, tree_masks: dict | None = None):
        self.pool = pool
        # Stage 14: sequence i -> the mask of its draft tree [new tokens, keys]; such a batch attends
        # sequence by sequence, as the CPU does.
        self.tree_masks = tree_masks or {}
        page_size = pool.page_size
        positions = batch.positions
        token_rows = batch.seq_rows.repeat_interleave(batch.new_lengths, output_size=batch.sizes.num_tokens)
        # Where each new token's K/V goes: its page (from the table) and its offset in the page.
        self.slots = tables.table[token_rows, positions // page_size] * page_size + positions % page_size
        packed = self.packed if self.packed is not None else positions.is_cuda and not self.tree_masks
        if batch.sizes.runs_per_seq:
            self.runs = RunAttention(batch.run_starts, batch.run_lens, batch.sizes.num_seqs, batch.sizes.max_run_len)
        elif packed:
            zero = batch.seq_lens.new_zeros(1)
            self.cu_seqlens_q = torch.cat([zero, batch.new_lengths.cumsum(0)])
            self.cu_seqlens_k = torch.cat([zero, batch.seq_lens.cumsum(0)])
            total = batch.sizes.total_keys
            key_rows = batch.seq_rows.repeat_interleave(batch.seq_lens, output_size=total)
            key_pos = torch.arange(total, device=positions.device) - self.cu_seqlens_k[:-1].repeat_interleave(batch.seq_lens, output_size=total)
            self.key_slots = tables.table[key_rows, key_pos // page_size] * page_size + key_pos % page_size
            self.max_q, self.max_k = batch.sizes.max_new_length, batch.sizes.max_seq_len
        else:
            self._plan_cpu(tables, batch)
        self.packed_layout = packed

    def _plan_cpu(self, tables: DevicePageTables, batch) -> None:
        """Decode rows: one padded [rows, longest] slot matrix; prompts: their own slot lists."""
        page_size = self.pool.page_size
        new_lengths, seq_lens = batch.new_lengths.tolist(), batch.seq_lens.tolist()
        starts = [0]
        for n in new_lengths:
            starts.append(starts[-1] + n)
        pages = tables.table[batch.seq_rows]  # [B, max_pages]
        decode = [i for i, n in enumerate(new_lengths) if n == 1]
        self.decode_queries = torch.tensor([starts[i] for i in decode], dtype=torch.long)
        if decode:
            longest = max(seq_lens[i] for i in decode)
            offsets = torch.arange(longest, device=pages.device)  # (on the device: a tree batch plans this way on CUDA too)
            padded_slots = pages[decode][:, offsets // page_size] * page_size + offsets % page_size
            self.key_mask = offsets[None, :] < torch.tensor([seq_lens[i] for i in decode], device=pages.device)[:, None]
            # Padding reads the row's first key (always written): a never-written slot may hold NaN,
            # and a masked NaN still poisons the output (its weight is 0, but 0 * NaN = NaN).
            self.padded_slots = torch.where(self.key_mask, padded_slots, padded_slots[:, :1])
        self.prompts = []
        for i, n in enumerate(new_lengths):
            if n != 1:
                positions = torch.arange(seq_lens[i], device=pages.device)
                slots = pages[i, positions // page_size] * page_size + positions % page_size
                self.prompts.append((starts[i], starts[i + 1], slots, self.tree_masks.get(i)))

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.pool.k[layer_index], self.pool.v[layer_index]
        k_pool.index_copy_(0, self.slots, k)
        v_pool.index_copy_(0, self.slots, v)
        if self.runs is not None:
            return self.runs(q, k_pool, v_pool)
        if self.packed_layout:
            return varlen_attention(
                q, k_pool[self.key_slots], v_pool[self.key_slots], self.cu_seqlens_q, self.cu_seqlens_k, self.max_q, self.max_k
            )
        out = torch.empty_like(q)
        if len(self.decode_queries):
            out[self.decode_queries] = self.decode_attention(q[self.decode_queries], k_pool, v_pool)
        for start, end, slots, tree in self.prompts:
            if tree is None:
                out[start:end] = causal_attention(q[start:end], k_pool[slots], v_pool[slots])
            else:  # a draft tree: each guess sees its ancestors, not the whole chunk before it
                out[start:end] = F.scaled_dot_product_attention(
                    q[start:end].transpose(0, 1), k_pool[slots].transpose(0, 1), v_pool[slots].transpose(0, 1),
                    attn_mask=tree, enable_gqa=True).transpose(0, 1)
        return out

    def decode_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """One query per sequence against its padded keys: ``q [B, heads, head_dim]`` -> same shape."""
        keys = k_pool[self.padded_slots].transpose(1, 2)  # [B, kv_heads, longest, head_dim]
        values = v_pool[self.padded_slots].transpose(1, 2)
        mask = self.key_mask[:, None, None, :]  # [B, 1, 1, longest]
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True)
        return out[:, :, 0, :]
