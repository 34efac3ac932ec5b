"""Model configuration, read from a checkpoint's ``config.json``.

The loader reads this first: it says which architecture the weights belong to
and every shape the model in ``qwen3.py`` needs. Field names follow the
Hugging Face config so a learner can compare the two files line by line.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

# Architectures the model in qwen3.py knows how to run. Llama is Qwen3 without
# the per-head q/k RMSNorm, so one module covers all three.
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "LlamaForCausalLM")


@dataclass
class ModelConfig:
    """Shapes and hyper-parameters of a Qwen3 / Qwen3-MoE / Llama checkpoint."""

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
    attention_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    # Mixture-of-experts fields (Qwen3-MoE); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each query and key head; Llama does not."""
        return self.architecture != "LlamaForCausalLM"

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
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            eos_token_ids=eos_token_ids,
            # transformers 5 writes num_local_experts; older configs write num_experts.
            num_experts=raw.get("num_experts", raw.get("num_local_experts", 0)) or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0) or 0,
            moe_intermediate_size=raw.get("moe_intermediate_size", 0) or 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=raw.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=list(raw.get("mlp_only_layers") or []),
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


def _architecture_from_model_type(raw: dict) -> str:
    """Older or converted configs may name only a model_type; map it to a class name."""
    by_type = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM"}
    model_type = raw.get("model_type", "")
    return by_type.get(model_type, model_type or "<missing architectures>")
