"""Causal attention over sequences whose keys/values come from a cache.

Every stage's attention backend ends in one of these calls once it has
gathered keys/values from its own cache layout (contiguous, paged, ...):

* ``causal_attention``: one sequence, through ``scaled_dot_product_attention``
  (any device);
* ``varlen_attention``: a whole batch of sequences of different lengths packed
  end to end, in a single call. On CUDA that is PyTorch's flash kernel
  ``torch.nn.attention.varlen.varlen_attn`` (in fp16 / bf16); elsewhere a loop
  over the sequences that computes the same thing (the reference it is tested
  against, and what fp32 on CUDA runs).
"""

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F


@functools.cache
def _flash_kernel():
    """PyTorch's varlen flash kernel and its keyword arguments for a causal and a full mask,
    imported on first use: importing it loads torch._dynamo, a second of every process's
    start that the CPU never needs."""
    from torch.nn.attention.varlen import varlen_attn as kernel

    # torch 2.10 spelled "causal" as is_causal=True; later versions as a (left, right) window.
    # Grouped KV heads need no copies: the flash kernel reads each KV head for its whole query group
    # (newer torch asks for enable_gqa=True to say so).
    parameters = inspect.signature(kernel).parameters
    if "window_size" in parameters:
        causal, full = {"window_size": (-1, 0)}, {"window_size": (-1, -1)}
    else:
        causal, full = {"is_causal": True}, {"is_causal": False}
    if "enable_gqa" in parameters:
        causal["enable_gqa"] = full["enable_gqa"] = True
    return kernel, causal, full


def varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q: int, max_k: int, causal: bool = True) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` with a causal or a full mask."""
    kernel, causal_mask, full_mask = _flash_kernel()
    return kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, **(causal_mask if causal else full_mask))


if importlib.util.find_spec("torch.nn.attention.varlen") is None:  # torch < 2.10: CUDA runs the per-sequence loop too
    varlen_attn = None

FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what the flash kernel computes in


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


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_q: int, max_k: int,
) -> torch.Tensor:
    """Causal attention for a packed batch: sequence ``i`` owns queries
    ``cu_seqlens_q[i] : cu_seqlens_q[i+1]`` of ``q [Tq, heads, head_dim]`` and keys
    ``cu_seqlens_k[i] : cu_seqlens_k[i+1]`` of ``k, v [Tk, kv_heads, head_dim]``.

    As in ``causal_attention``, the queries are a sequence's *newest* tokens:
    the causal triangle is aligned to the end of its keys, so a decode row (one
    query) sees all of its keys and a prompt chunk sees its cached prefix.
    ``max_q`` / ``max_k`` are the longest query / key runs (host ints, so the
    call needs no sync). Returns ``[Tq, heads, head_dim]``.
    """
    if q.is_cuda and varlen_attn is not None and q.dtype in FLASH_DTYPES:
        if max_q == 1 and q.shape[1] > k.shape[1]:
            return _decode_with_grouped_queries(q, k, v, cu_seqlens_k, max_k)
        return varlen_attn(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k)
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[i : i + 2], bounds_k[i : i + 2]
        out[q0:q1] = causal_attention(q[q0:q1], k[k0:k1], v[k0:k1])
    return out


def _decode_with_grouped_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """A decode batch (one query per sequence) with ``groups`` query heads per KV head.

    The kernel reads a KV head once per *query head* it serves, so grouped heads
    would read every key ``groups`` times. Instead, the query heads that share a
    KV head become ``groups`` query rows of one head: ``[B, kv_heads * groups, d]``
    -> ``[B * groups, kv_heads, d]``. A decode query sees every key of its
    sequence, so no causal mask is needed, and each key is read once.
    """
    batch, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    rows = q.view(batch, kv_heads, groups, dim).transpose(1, 2).reshape(batch * groups, kv_heads, dim)
    cu_seqlens_q = torch.arange(0, (batch + 1) * groups, groups, device=q.device, dtype=torch.int32)
    out = varlen_attn(rows, k, v, cu_seqlens_q, cu_seqlens_k.int(), groups, max_k, causal=False)
    return out.view(batch, groups, kv_heads, dim).transpose(1, 2).reshape(batch, heads, dim)
