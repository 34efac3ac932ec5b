"""Random-weight checkpoints of real model shapes, written offline from a config.

The GPU box has no network, so Qwen3-0.6B / Qwen3-8B / a cut-down Qwen3-30B-A3B
are rebuilt there: config.json + random safetensors + the built-in tokenizer.
Speed depends on shapes, not on trained values.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.config import ModelConfig
from common.loader import cache_dir, checkpoint_names, resolve_model_path
from common.qwen3 import Qwen3ForCausalLM

QWEN3_BASE = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, max_position_embeddings=40960,
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, attention_bias=False, head_dim=128, eos_token_id=2,
)
SHAPES = {
    "qwen3-0.6b": dict(QWEN3_BASE, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(QWEN3_BASE, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # Qwen3-30B-A3B with 8 of its 48 layers: the real expert shapes, a size that fits one GPU.
    "qwen3-30b-a3b-8l": dict(QWEN3_BASE, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                             hidden_size=2048, intermediate_size=6144, num_hidden_layers=8, num_attention_heads=32,
                             num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
}


def random_checkpoint(shape: str, device: str = "cpu", root: Path | None = None) -> Path:
    """Write (once) a random-weight checkpoint of ``shape`` and return its folder."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    folder = (root or cache_dir() / "random") / shape
    if (folder / "config.json").exists():
        cover_vocab(folder, SHAPES[shape]["vocab_size"])  # a folder written before the tokenizer was covered
        return folder
    raw = SHAPES[shape]
    names = checkpoint_shapes(ModelConfig.from_dict(raw))
    if raw["tie_word_embeddings"]:
        names.pop("lm_head.weight")
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(0)
    shards, shard_bytes = [{}], 0
    for name, size in names.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(size, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(size, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        if shard_bytes > 2 << 30:  # 2 GiB shards, as hub checkpoints do
            shards, shard_bytes = shards + [{}], 0
        shards[-1][name], shard_bytes = tensor, shard_bytes + tensor.nbytes
    _save_shards(shards, folder)
    # $QWEN3_LADDER_TOKENIZER names a folder with tokenizer files (the GPU box has no built-in model).
    tokenizer_folder = Path(os.environ.get("QWEN3_LADDER_TOKENIZER") or resolve_model_path(None))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)
    cover_vocab(folder, raw["vocab_size"])
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    return folder


def cover_vocab(folder: Path, vocab_size: int) -> None:
    """Give every token id the model can sample a word of its own in the folder's tokenizer.

    The built-in tokenizer has 49,152 tokens; Qwen3's vocabulary has 151,936. A random model samples
    all of them, and an id the tokenizer lacks decodes to no text at all, so a served stream would
    send nothing for it: the server's first chunk (and a client's time to first token) would wait for
    the first id that has text, where a trained model's tokenizer covers every id. The new words
    (" w49152", ...) are never produced by encoding (no merges make them); they only decode.
    """
    path = folder / "tokenizer.json"
    if not path.exists():
        return
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    taken = set(vocab.values()) | {token["id"] for token in tokenizer["added_tokens"]}
    if len(taken) >= vocab_size or tokenizer["model"]["type"] != "BPE" or tokenizer["decoder"]["type"] != "ByteLevel":
        return
    for token_id in range(vocab_size):
        if token_id not in taken:
            vocab[f"\u0120w{token_id}"] = token_id  # "\u0120" is ByteLevel's space: the word decodes as " w49152"
    path.write_text(json.dumps(tokenizer, ensure_ascii=False))


def checkpoint_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor a hub checkpoint of ``config`` holds, by name: the model's parameters,
    with each fused projection (``FUSED_PROJECTIONS``) given as its separate parts."""
    q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    with torch.device("meta"):
        parameters = Qwen3ForCausalLM(config).state_dict()
    shapes = {}
    for name, tensor in parameters.items():
        parts = checkpoint_names(name)
        rows = [q_rows, kv_rows, kv_rows] if ".qkv_proj." in name else [tensor.shape[0] // len(parts)] * len(parts)
        for part, piece in zip(parts, tensor.split(rows) if len(parts) > 1 else [tensor]):
            shapes[part] = piece.shape
    return shapes


def _save_shards(shards: list[dict], folder: Path) -> None:
    """One model.safetensors, or numbered shards plus the index transformers looks for."""
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
