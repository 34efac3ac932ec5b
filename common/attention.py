"""Causal attention of one sequence's new queries over its cached keys and values.

Every stage's attention backend ends in this call once it has gathered a
sequence's keys/values from its own cache layout (contiguous, paged, ...).
"""

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention for the newest ``n`` tokens of a sequence of length ``L``.

    ``q [n, heads, head_dim]`` are the new queries, at positions ``L-n .. L-1``;
    ``k, v [L, kv_heads, head_dim]`` hold every key/value so far, the new ones
    included. Query i may look at keys ``0 .. L-n+i``. Returns ``[n, heads, head_dim]``.
    """
    n, total = q.shape[0], k.shape[0]
    # Give every query head its own copy of its KV head: with equal head counts SDPA may pick
    # a fused (flash) kernel on CUDA, which never materializes the [heads, n, L] score matrix.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first for SDPA
    if n == 1:
        mask, is_causal = None, False  # one query at the end sees everything
    elif n == total:
        mask, is_causal = None, True  # plain prefill: the usual lower triangle
    else:
        # Prefill on top of a cached prefix: the triangle is shifted right by L-n.
        query_pos = torch.arange(total - n, total, device=q.device)[:, None]
        mask, is_causal = torch.arange(total, device=q.device)[None, :] <= query_pos, False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return out.transpose(0, 1)
