"""Model configuration, read from a checkpoint's ``config.json``.

The loader reads this first: it says which architecture the weights belong to
and every shape the model in ``qwen3.py`` needs. Field names follow the
Hugging Face config so a learner can compare the two files line by line.
"""

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Architectures the model in qwen3.py knows how to run. They differ in a few switches,
# so one module covers them all: Llama and Mistral are Qwen3 without the per-head q/k
# RMSNorm; Qwen2 / Qwen2.5 add biases to the q/k/v projections; Qwen2-MoE adds a shared
# expert beside the routed ones.
QWEN3_FAMILY = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
QWEN2_FAMILY = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
SUPPORTED_ARCHITECTURES = QWEN3_FAMILY + QWEN2_FAMILY + ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass
class ModelConfig:
    """Shapes and hyper-parameters of a checkpoint of one of ``SUPPORTED_ARCHITECTURES``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2 family; Llama's attention_bias)
    o_proj_bias: bool = False  # a bias on the attention output projection (Llama's attention_bias)
    sliding_window: int | None = None  # keys a query sees, when some layer limits it (Mistral, Qwen2)
    eos_token_ids: list[int] = field(default_factory=list)
    # Mixture-of-experts fields (Qwen3-MoE); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one always-on expert beside the routed ones

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each query and key head; Qwen2, Llama and Mistral do not."""
        return self.architecture in QWEN3_FAMILY

    def context_note(self, context_length: int) -> str:
        """Why the context is ``context_length``, when a sliding window set it (for error messages)."""
        if self.sliding_window is not None and context_length >= self.sliding_window:
            return f" (its sliding_window={self.sliding_window}: sliding-window attention is served only up to the window)"
        return ""

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` uses the sparse expert block (Qwen3-MoE rule)."""
        return (
            self.num_experts > 0
            and layer_index not in self.mlp_only_layers
            and (layer_index + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Build from the JSON dict of a Hugging Face ``config.json``."""
        architectures = raw.get("architectures") or []
        architecture = architectures[0] if architectures else _architecture_from_model_type(raw)
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"checkpoint architecture {architecture!r} is not supported; "
                f"this engine runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 moved rope_theta / rope_scaling into one rope_parameters dict.
        rope = dict(raw.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        rope_scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = raw.get("eos_token_id")
        eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        heads = raw["num_attention_heads"]
        attention_bias = bool(raw.get("attention_bias", False))
        # Qwen2 always has q/k/v biases (its config has no switch); Qwen2-MoE names it qkv_bias.
        qkv_bias = attention_bias or (architecture in QWEN2_FAMILY and bool(raw.get("qkv_bias", True)))
        max_positions = raw.get("max_position_embeddings", 32768)
        window = _sliding_window(raw, architecture)
        if window is not None and window < max_positions:
            # Up to the window, sliding-window attention is exactly full attention; beyond it the
            # attention backends here would compute something else, so longer contexts are refused.
            warnings.warn(
                f"sliding_window={window} is smaller than max_position_embeddings={max_positions}: "
                f"this engine serves contexts up to {window} tokens, where sliding-window attention "
                "equals full attention",
                stacklevel=2,
            )
            max_positions = window
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=attention_bias,
            sliding_window=window,
            eos_token_ids=eos_token_ids,
            # transformers 5 writes num_local_experts; older configs write num_experts.
            num_experts=raw.get("num_experts", raw.get("num_local_experts", 0)) or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0) or 0,
            moe_intermediate_size=raw.get("moe_intermediate_size", 0) or 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=raw.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=list(raw.get("mlp_only_layers") or []),
            shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 0) or 0,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ValueError(f"no config.json in {path.parent}; is this a model checkpoint folder?")
        return cls.from_dict(json.loads(path.read_text()))


def _sliding_window(raw: dict, architecture: str) -> int | None:
    """The sliding window some layer uses, or None when every layer attends to all keys.

    Mistral applies ``sliding_window`` to every layer when it is set. Qwen2 has
    one only with ``use_sliding_window``, and then only in the layers that
    ``layer_types`` marks (older configs: layers from ``max_window_layers`` on).
    """
    window = raw.get("sliding_window") or None
    if window is None or architecture not in QWEN2_FAMILY + ("MistralForCausalLM",):
        return None
    if architecture in QWEN2_FAMILY:
        layer_types = raw.get("layer_types")
        if layer_types is not None:
            return window if "sliding_attention" in layer_types else None
        if not raw.get("use_sliding_window", False):
            return None
        if raw.get("max_window_layers", 0) >= raw["num_hidden_layers"]:
            return None
    return int(window)


def _architecture_from_model_type(raw: dict) -> str:
    """Older or converted configs may name only a model_type; map it to a class name."""
    by_type = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mistral": "MistralForCausalLM"}
    model_type = raw.get("model_type", "")
    return by_type.get(model_type, model_type or "<missing architectures>")
