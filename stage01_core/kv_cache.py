"""Stage 01's KV cache: one contiguous buffer per request.

When a request starts we reserve room for its longest possible life
(prompt + max_tokens) in every layer, whether or not it ever uses it. It is
the simplest correct cache, and the waste it leaves (memory follows the
maximum length, not the tokens in use) is what stage02's paging removes.
"""

import torch

from common.attention import causal_attention
from common.config import ModelConfig


class ContiguousKVCache:
    """Keys and values of one request: ``[layers, max_tokens, kv_heads, head_dim]`` each."""

    def __init__(self, config: ModelConfig, max_tokens: int, device: torch.device, dtype: torch.dtype):
        shape = (config.num_hidden_layers, max_tokens, config.num_key_value_heads, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class ContiguousAttention:
    """The attention backend for one forward over a batch of requests.

    Sequence ``i`` contributes ``new_lengths[i]`` tokens to the flat batch,
    written into its own cache after ``cached_lengths[i]`` tokens already
    there. Sequences are attended one by one: simple, and fine for a course
    stage; later stages batch this.
    """

    def __init__(self, caches: list[ContiguousKVCache], cached_lengths: list[int], new_lengths: list[int]):
        self.caches = caches
        self.cached_lengths = cached_lengths
        self.new_lengths = new_lengths

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        offset = 0
        for cache, start, n in zip(self.caches, self.cached_lengths, self.new_lengths):
            end = start + n
            cache.k[layer_index, start:end] = k[offset : offset + n]
            cache.v[layer_index, start:end] = v[offset : offset + n]
            out[offset : offset + n] = causal_attention(
                q[offset : offset + n], cache.k[layer_index, :end], cache.v[layer_index, :end]
            )
            offset += n
        return out
