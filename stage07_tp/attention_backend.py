"""Stage 02's attention backend: how one forward reads and writes the paged KV pool.

The model calls attention once per layer with that layer's new ``q, k, v``
(``common/qwen3.py``). What the call must do depends on where keys and values
live, so the model runner owns one *backend*, chosen by name
(``--attention-backend``), and asks it once per forward to *prepare* the
batch's metadata, the work every layer shares:

    backend = ATTENTION_BACKENDS[args.attention_backend](pool, page_tables)  # at start-up
    attention = backend.prepare(batch)     # per forward: where new K/V go, where keys are read
    out = attention(layer_index, q, k, v)  # per layer: write the new K/V into the pool, attend

Backends register by name (``@register_backend("gather")``), so a later stage
adds one by adding a file. This stage has one, ``gather``: each sequence's
keys are gathered from its pages, then attended (``GatherAttention``).
(SGLang's ``--attention-backend`` and its backend registry; mini-sglang's
``prepare_metadata`` / ``forward``.)
"""

import torch
import torch.nn.functional as F

from common.attention import causal_attention, varlen_attention

ATTENTION_BACKENDS: dict[str, type["AttentionBackend"]] = {}  # name -> backend class


def register_backend(name: str):
    """Class decorator: make a backend choosable as ``attention_backend=name``."""

    def register(backend: type["AttentionBackend"]) -> type["AttentionBackend"]:
        backend.name = name
        ATTENTION_BACKENDS[name] = backend
        return backend

    return register


def default_backend(device: torch.device) -> str:
    """The backend a device gets when the settings name none: this stage has one."""
    return "gather"


class AttentionBackend:
    """What every backend offers the model runner: built once over the pool and the
    device page tables (``kv_cache.py``), it prepares each forward's attention."""

    name: str

    def __init__(self, pool, page_tables):
        self.pool, self.page_tables = pool, page_tables

    def prepare(self, batch):
        """This batch's attention: a callable ``(layer_index, q, k, v) -> out`` that every layer calls."""
        raise NotImplementedError


@register_backend("gather")
class GatherBackend(AttentionBackend):
    """Gather each sequence's keys out of its pages, then attend them (``GatherAttention``)."""

    def prepare(self, batch):
        return GatherAttention(self.pool, self.page_tables, batch)


class GatherAttention:
    """The ``gather`` backend's attention for one forward over a batch, reading K/V through page tables.

    Sequence ``i`` feeds its next ``new_lengths[i]`` tokens (its positions
    ``seq_lens[i] - new_lengths[i] ..``) and attends over its first
    ``seq_lens[i]`` tokens. Batches may mix one-token decodes and prompts.

    On CUDA every sequence's keys are gathered from their pages into one
    packed buffer and a single flash ``varlen_attention`` call attends the
    whole batch. On the CPU the decode rows share one padded SDPA call (keys
    padded to the longest, padding masked out) and each prompt is attended on
    its own. ``packed`` forces the CUDA layout on the CPU (tests use it).
    """

    packed: bool | None = None  # None: packed on CUDA, padded/per-sequence on the CPU

    def __init__(self, pool, tables, batch):
        self.pool = pool
        page_size = pool.page_size
        positions = batch.positions
        token_rows = batch.seq_rows.repeat_interleave(batch.new_lengths, output_size=batch.sizes.num_tokens)
        # Where each new token's K/V goes: its page (from the table) and its offset in the page.
        self.slots = tables.table[token_rows, positions // page_size] * page_size + positions % page_size
        packed = self.packed if self.packed is not None else positions.is_cuda
        if packed:
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

    def _plan_cpu(self, tables, batch) -> None:
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
            offsets = torch.arange(longest, device=pages.device)
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
                self.prompts.append((starts[i], starts[i + 1], slots))

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.pool.k[layer_index], self.pool.v[layer_index]
        k_pool.index_copy_(0, self.slots, k)
        v_pool.index_copy_(0, self.slots, v)
        if self.packed_layout:
            return varlen_attention(
                q, k_pool[self.key_slots], v_pool[self.key_slots], self.cu_seqlens_q, self.cu_seqlens_k, self.max_q, self.max_k
            )
        out = torch.empty_like(q)
        if len(self.decode_queries):
            out[self.decode_queries] = self.decode_attention(q[self.decode_queries], k_pool, v_pool)
        for start, end, slots in self.prompts:
            out[start:end] = causal_attention(q[start:end], k_pool[slots], v_pool[slots])
        return out

    def decode_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """One query per sequence against its padded keys: ``q [B, heads, head_dim]`` -> same shape."""
        keys = k_pool[self.padded_slots].transpose(1, 2)  # [B, kv_heads, longest, head_dim]
        values = v_pool[self.padded_slots].transpose(1, 2)
        mask = self.key_mask[:, None, None, :]  # [B, 1, 1, longest]
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True)
        return out[:, :, 0, :]
