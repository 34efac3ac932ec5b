"""Model FLOPs of a prompt, and the share of a GPU's peak a run reached (model FLOPs utilisation).

Counted as the model's math needs them, whatever an engine does: every
projection's multiply-adds (2 FLOPs each) for every prompt token, the LM
head for the one row sampled, and attention's two matmuls over the keys each
query sees (causal: query ``i`` sees ``i + 1`` keys). Experts count as the
``num_experts_per_tok`` a token is routed to.
"""

from common.config import ModelConfig

# Dense bf16 tensor-core peak, FLOP/s, from the vendor's data sheets (SXM parts, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def prompt_flops(config: ModelConfig, length: int) -> float:
    """FLOPs to prefill one prompt of ``length`` tokens and score its last row."""
    hidden, heads, kv_heads, dim = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention_weights = hidden * (heads + 2 * kv_heads) * dim + heads * dim * hidden
    if config.num_experts:
        mlp_weights = 3 * hidden * config.moe_intermediate_size * config.num_experts_per_tok + hidden * config.num_experts
    else:
        mlp_weights = 3 * hidden * config.intermediate_size
    per_token = 2 * config.num_hidden_layers * (attention_weights + mlp_weights)
    keys_seen = length * (length + 1) // 2  # causal: every query up to its own position
    attention = 2 * 2 * config.num_hidden_layers * heads * dim * keys_seen  # scores, then the weighted values
    return per_token * length + attention + 2 * hidden * config.vocab_size


def peak_flops(gpu_name: str | None) -> float | None:
    """The bf16 peak of a GPU this table knows by name (``torch.cuda.get_device_name()``), else None."""
    return next((peak for name, peak in PEAK_BF16_FLOPS.items() if gpu_name and name in gpu_name), None)
