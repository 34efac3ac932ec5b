"""Stage 02's KV cache: one preallocated pool of pages shared by all requests.

Per layer, keys and values live in ``[num_pages, page_size, kv_heads, head_dim]``
tensors allocated once from a memory budget. A request's tokens are scattered
over pages listed in its page table (see ``page_allocator.py``); attention
gathers them back in order. The pool, not any request's maximum length,
bounds how many tokens can be cached.
"""

import torch
import torch.nn.functional as F

from common.attention import causal_attention
from common.config import ModelConfig


class PagedKVPool:
    """Keys and values of every cached token: ``[layers, num_pages * page_size, kv_heads, head_dim]``.

    Stored flat over slots (slot = page * page_size + offset) so writes are
    one ``index_copy_`` per layer; ``pages(layer)`` shows the paged view.
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


def token_slots(page_table: list[int], start: int, end: int, page_size: int) -> torch.Tensor:
    """Pool slots of token positions ``start .. end-1`` of a sequence: page * page_size + offset.

    Computed on the CPU: callers concatenate a whole batch and copy it to the
    device once, since every small host-to-device copy stalls the GPU queue.
    """
    positions = torch.arange(start, end)
    pages = torch.tensor(page_table, dtype=torch.long)
    return pages[positions // page_size] * page_size + positions % page_size


class PagedAttention:
    """The attention backend for one forward over a batch, reading K/V through page tables.

    ``slots [T]`` says where each new token's K/V goes in the pool. Sequence
    ``i`` then attends over its first ``seq_lens[i]`` tokens, gathered from
    its pages. The batch may mix decode and prefill: the decode sequences (one
    new token each) come first and are attended in a single call, keys padded
    to the longest and the padding masked out; the prefill sequences (prompts
    or prompt chunks of different lengths, packed varlen) follow and are
    attended one by one, since each already has many queries.
    """

    def __init__(self, pool: PagedKVPool, slots: torch.Tensor, page_tables: list[list[int]], new_lengths: list[int], seq_lens: list[int]):
        self.pool = pool
        self.slots = slots
        self.new_lengths = new_lengths
        self.seq_lens = seq_lens
        cpu_slots = [token_slots(table, 0, length, pool.page_size) for table, length in zip(page_tables, seq_lens)]
        self.gather_slots = torch.cat(cpu_slots).to(slots.device).split(seq_lens)
        self.num_decode = next((i for i, n in enumerate(new_lengths) if n != 1), len(new_lengths))
        if self.num_decode:
            # [decodes, longest] slots, padding pointed at slot 0 and masked out.
            padded = torch.nn.utils.rnn.pad_sequence(cpu_slots[: self.num_decode], batch_first=True)
            key_mask = torch.arange(padded.shape[1])[None, :] < torch.tensor(seq_lens[: self.num_decode])[:, None]
            self.padded_slots, self.key_mask = padded.to(slots.device), key_mask.to(slots.device)

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.pool.k[layer_index], self.pool.v[layer_index]
        k_pool.index_copy_(0, self.slots, k)
        v_pool.index_copy_(0, self.slots, v)
        out = torch.empty_like(q)
        offset = self.num_decode
        if self.num_decode:
            out[:offset] = self.decode_attention(q[:offset], k_pool, v_pool)
        for n, slots in zip(self.new_lengths[self.num_decode :], self.gather_slots[self.num_decode :]):
            out[offset : offset + n] = causal_attention(q[offset : offset + n], k_pool[slots], v_pool[slots])
            offset += n
        return out

    def decode_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """One query per sequence against its padded keys: ``q [B, heads, head_dim]`` -> same shape."""
        keys = k_pool[self.padded_slots].transpose(1, 2)  # [B, kv_heads, longest, head_dim]
        values = v_pool[self.padded_slots].transpose(1, 2)
        mask = self.key_mask[:, None, None, :]  # [B, 1, 1, longest]
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True)
        return out[:, :, 0, :]
