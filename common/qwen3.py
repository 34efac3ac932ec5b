"""Qwen3 (dense and MoE) in plain PyTorch; Qwen2, Qwen2-MoE, Llama and Mistral run through the same code.

Data flow of one forward:
    token ids [T] -> embed -> N x (RMSNorm -> attention -> RMSNorm -> MLP or MoE) -> RMSNorm
    -> hidden [T, hidden] -> lm_head (only for the rows the caller wants) -> logits.

Tokens are laid out flat: the T tokens of every sequence in the batch are
concatenated, each with its own position. The model never sees a KV cache.
Each attention layer hands its fresh q, k, v to an ``attention`` object the
caller passes in; that object stores k/v in whatever cache the stage owns and
returns the attention output. That is how stage01's contiguous cache and
stage02's paged pool plug into this same file.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ModelConfig
from common.rope import apply_rotary, rope_frequencies

# Projections the model runs as one matmul, and the checkpoint tensors stacked (in this
# order, along the output features) to make each; ``common/loader.py`` does the stacking.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class AttentionBackend(Protocol):
    """What a stage provides to run attention with its own KV cache."""

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k, v [T, kv_heads, head_dim]`` for this layer and return
        the attention output ``[T, heads, head_dim]`` for ``q [T, heads, head_dim]``."""
        ...


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as the reference does."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is that formula as one fused call: it accumulates in fp32 whatever the input
        # dtype, and a separate cast and weight multiply would be three more launches per norm.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def add_linear(residual: torch.Tensor, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``: a block's last projection added into the residual stream.

    For a plain bias-free ``nn.Linear`` this is one matmul that accumulates into
    ``residual`` in place (the GEMM's ``C = A @ B + C``): one kernel instead of a
    matmul and an add, twice a layer. Any other layer (tensor-parallel, whose sum
    over ranks must come before the add; LoRA; biased) runs as written. The
    caller must own ``residual`` (a layer's input, read by nothing after it).
    """
    if type(linear) is nn.Linear and linear.bias is None:
        return residual.addmm_(x, linear.weight.t())
    return residual + linear(x)


class Attention(nn.Module):
    """Grouped-query attention: ``heads`` query heads share ``kv_heads`` key/value heads."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # q, k and v as one matmul (the checkpoint's q_proj, k_proj, v_proj stacked by the
        # loader): one weight read and one kernel launch instead of three.
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=config.qkv_bias)  # Qwen2: biased
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        # Qwen3's addition over Llama: an RMSNorm on every query and key head before RoPE.
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def stack_head_norms(self) -> None:
        """Qwen3: the q and k norms' weights as one row per head, ``[heads + kv_heads, head_dim]``,
        so both norms run as one call (``forward``). Made once the weights are loaded and the
        head counts are this rank's."""
        if hasattr(self, "q_norm"):
            q, k = self.q_norm.weight.detach(), self.k_norm.weight.detach()
            self.qk_norm_weight = torch.cat([q.expand(self.num_heads, -1), k.expand(self.num_kv_heads, -1)])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionBackend,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``x``, or with ``residual`` given, ``residual`` plus it (see ``add_linear``)."""
        tokens, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(tokens, heads + 2 * kv_heads, self.head_dim)  # every head of q, k, v
        qk, v = qkv.split([heads + kv_heads, kv_heads], dim=1)
        if hasattr(self, "q_norm"):
            # Every q and k head normalized in one call, then scaled by its own norm's weight (the
            # rounding of transformers' Qwen3RMSNorm: normalized in fp32, cast, then the weight).
            # The call normalizes v's heads too, unused: qkv is contiguous, while its q and k heads
            # alone are a strided view the norm would first copy out (a prompt chunk's largest copy).
            normed = F.rms_norm(qkv, (self.head_dim,), eps=self.q_norm.eps)
            qk = normed[:, : heads + kv_heads] * self.qk_norm_weight
        q, k = apply_rotary(qk, cos, sin).split([heads, kv_heads], dim=1)  # [T, heads | kv_heads, head_dim]
        out = attention(self.layer_index, q, k, v)  # [T, heads, head_dim]
        out = out.reshape(tokens, -1)
        return self.o_proj(out) if residual is None else add_linear(residual, self.o_proj, out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with gate and up as one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)  # [gate; up] rows
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of ``x``, or with ``residual`` given, ``residual`` plus it (see ``add_linear``)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        return self.down_proj(hidden) if residual is None else add_linear(residual, self.down_proj, hidden)


class SparseMoE(nn.Module):
    """Qwen3-MoE block: a router picks ``top_k`` of ``num_experts`` SwiGLU experts per token.

    Each token's output is the router-weighted sum of its chosen experts'
    outputs. Only experts that received tokens run. Qwen2-MoE adds a shared
    expert that every token goes through, scaled by a learned sigmoid gate.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        # Expert parallelism keeps only some experts on each rank and skips the
        # rest here; their share of the output arrives through an all-reduce.
        self.local_experts = range(config.num_experts)
        self.reduce_routed = None  # expert parallelism: sums the routed outputs of all ranks
        self.expert_token_counts: torch.Tensor | None = None  # set to a [num_experts] tensor to count routing
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)  # one scale per token

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(weights [T, top_k], expert ids [T, top_k])`` for tokens ``x [T, hidden]``."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), expert_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.route(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # Not counted: a graph's padding rows would be counted with the real ones.
            out = self.forward_every_expert(x, weights, expert_ids)
        else:
            out = self.forward_routed(x, weights, expert_ids)
        if self.reduce_routed is not None:
            out = self.reduce_routed(out)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def forward_routed(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Each token through its chosen experts (those on this rank), weighted and summed."""
        if self.expert_token_counts is not None:
            self.expert_token_counts += torch.bincount(expert_ids.flatten(), minlength=len(self.experts))
        out = torch.zeros_like(x)
        for expert in expert_ids.unique().tolist():
            if expert not in self.local_experts:
                continue
            token_index, slot = torch.where(expert_ids == expert)
            expert_out = self.experts[expert](x[token_index]) * weights[token_index, slot, None]
            out.index_add_(0, token_index, expert_out)
        return out

    def forward_every_expert(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The same sum with no host sync, for CUDA-graph capture (stage 09).

        A captured graph cannot ask which experts were picked (``.tolist()``
        waits for the GPU), so every local expert runs on every token and a
        token's weight for an expert it did not pick is 0. More arithmetic,
        fixed shapes: fine for the small batches of a decode step.
        """
        out = torch.zeros_like(x)
        for expert in self.local_experts:
            weight = (weights * (expert_ids == expert)).sum(dim=-1, keepdim=True)  # [T, 1], 0 if not picked
            out += self.experts[expert](x) * weight
        return out


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        if config.is_moe_layer(layer_index):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        # Each block adds its output into the residual stream x (in place: see add_linear).
        x = self.self_attn(self.input_layernorm(x), cos, sin, attention, residual=x)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MLP):
            return self.mlp(h, residual=x)
        return x + self.mlp(h)  # MoE: tensor parallelism sums its output over the ranks (a hook) before the add


class Qwen3Model(nn.Module):
    """Embedding, the decoder stack and the final norm (no output head)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # The checkpoint fills every weight, so the table skips nn.Embedding's random init (on the
        # meta device its normal_ imports torch._dynamo: ~1.5 s of every process's start).
        table = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq, self.attention_factor = rope_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[T, head_dim]`` for each token's position, computed in fp32
        (the sign is folded in once per forward, not per layer: see ``apply_rotary``)."""
        angles = positions[:, None].float() * self.inv_freq[None, :].float()  # [T, head_dim / 2]
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """The language model: ``forward`` gives hidden states, ``compute_logits`` the next-token scores.

    Parameter names match the Hugging Face checkpoints, except the fused
    projections (``FUSED_PROJECTIONS``), so loading is a name-for-name copy
    plus one stacking step (see ``common/loader.py``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def materialize_buffers(self, device: str | torch.device) -> None:
        """After weights were assigned onto a ``meta``-built model: re-tie the
        output head, compute the RoPE frequencies on ``device`` and stack the
        head norms' weights."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, _ = rope_frequencies(
            self.config.head_dim, self.config.rope_theta, self.config.rope_scaling, self.config.max_position_embeddings
        )
        self.model.inv_freq = inv_freq.to(device)
        for module in self.modules():  # the attention layers this rank holds (a pipeline rank holds some)
            if isinstance(module, Attention):
                module.stack_head_norms()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        """``input_ids, positions [T]`` -> hidden states ``[T, hidden]``."""
        return self.model(input_ids, positions, attention)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden rows ``[N, hidden]`` -> logits ``[N, vocab]`` in fp32 for sampling; written into
        ``out`` when given (a CUDA graph's fixed buffer: the cast to fp32 is the copy)."""
        logits = self.lm_head(hidden)
        return logits.float() if out is None else out.copy_(logits)
