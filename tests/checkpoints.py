"""Small random checkpoints written by transformers' own ``save_pretrained``.

Tests load these through the real loading path (config.json + safetensors +
tokenizer files), and compare against transformers' models on the same files.
They borrow the built-in model's tokenizer (SmolLM2's 49k BPE vocab).
"""

import hashlib
import importlib.metadata
import itertools
import json
import os
import shutil
from pathlib import Path

import torch

# A bigger init than the default 0.02 keeps logits well separated, so greedy
# choices are not decided by rounding noise.
COMMON = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)

# kind -> (transformers' config class, its model class, the kind's own config fields). The classes
# are named, not imported: importing the first model class costs a process ~4.5 s of transformers'
# modelling code, and a process whose checkpoints are already saved never needs it (``saved``).
KINDS = {
    "dense": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    "moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0],
             num_hidden_layers=3, tie_word_embeddings=False),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    # The other families: q/k/v biases and no q/k norm (Qwen2), plus a shared expert (Qwen2-MoE),
    # Llama's layout under another name (Mistral).
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             norm_topk_prob=False, mlp_only_layers=[0], num_hidden_layers=3, tie_word_embeddings=False),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
}
FAMILIES = ["qwen2", "qwen2_moe", "mistral"]  # beyond Qwen3 / Qwen3-MoE / Llama


CACHE = Path(__file__).resolve().parent.parent / ".cache" / "test-checkpoints"


def random_model(kind: str, seed: int = 0, **overrides):
    """transformers' own ``kind`` model with random weights (``torch.manual_seed(seed)`` first)."""
    import transformers

    config_name, model_name, extra = KINDS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    return getattr(transformers, model_name)(config).eval()


def saved(folder: Path, recipe: dict, tokenizer_folder: Path, build) -> Path:
    """``folder`` filled with what ``build(staging_folder)`` saves for ``recipe``: built once, kept in
    ``.cache/test-checkpoints/`` and copied from there by every later call, in any process.

    A pytest process would otherwise build its checkpoints again, importing transformers'
    model classes to do it (each xdist worker, each exercise round, each ``--stage`` run). The
    key is everything the bytes depend on: the recipe, this file, the tokenizer files and the
    torch and transformers versions; a copy, so a test may change its folder freely.
    """
    tokenizer = sorted((f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in Path(tokenizer_folder).iterdir()
                       if f.is_file() and ("token" in f.name or f.suffix == ".jinja"))
    versions = [importlib.metadata.version(name) for name in ("torch", "transformers")]
    key = json.dumps([recipe, tokenizer, versions, hashlib.sha256(Path(__file__).read_bytes()).hexdigest()], sort_keys=True)
    cached = CACHE / f"{recipe['name']}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not cached.is_dir():
        staging = CACHE / f".{cached.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        build(staging)
        try:
            staging.rename(cached)  # atomic: no reader sees half a checkpoint
        except OSError:  # another process saved it first (the same bytes)
            shutil.rmtree(staging)
    shutil.copytree(cached, folder, dirs_exist_ok=True)
    return Path(folder)


def write_checkpoint(kind: str, folder: Path, tokenizer_folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a random ``kind`` model (a key of ``KINDS``) plus a tokenizer into ``folder``."""

    def build(out: Path) -> None:
        random_model(kind, seed, **overrides).save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tokenizer_folder / name).exists():
                shutil.copy(tokenizer_folder / name, out / name)

    return saved(folder, dict(name=kind, seed=seed, overrides=overrides), tokenizer_folder, build)


# A Hermes-style chat template that renders tools, tool calls and tool results (the built-in
# model's template knows none of them).
TOOLS_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call these functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as <tool_call>{"name": <name>, "arguments": <arguments object>}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls or [] %}<tool_call>{"name": "{{ call.function.name }}", \
"arguments": {{ call.function.arguments }}}</tool_call>{% endfor %}<|im_end|>
{% elif message.role != 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def write_scripted_checkpoint(folder: Path, tokenizer_folder: Path, script: list[int]) -> Path:
    """A random Qwen3 checkpoint whose next token depends only on the current one, and that,
    from ``script[0]`` on, greedily says ``script[1:]``; elsewhere its logits are random.

    Every layer's output projections are zero, so the logits are the current token's
    embedding through the final norm and the head. The script's tokens get embeddings
    on dimensions of their own (zero in every other embedding) and the head maps each to
    the next one. A token may occur twice in the script only with the same successor.
    """
    successor = {}
    for token, following in itertools.pairwise(script):
        assert successor.setdefault(token, following) == following, f"token {token} needs two successors"

    def build(out: Path) -> None:
        model = random_model("dense")
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            embed[:, : len(successor)] = 0.0  # the script's own dimensions
            for dim, (token, following) in enumerate(successor.items()):
                embed[token] = 0.0
                embed[token, dim] = 1.0
                head[following, dim] = 30.0
        model.save_pretrained(out)
        shutil.copy(tokenizer_folder / "tokenizer.json", out / "tokenizer.json")
        shutil.copy(tokenizer_folder / "tokenizer_config.json", out / "tokenizer_config.json")
        (out / "chat_template.jinja").write_text(TOOLS_TEMPLATE)

    return saved(folder, dict(name="scripted", script=script), tokenizer_folder, build)


def write_near_copy(folder: Path, out: Path, noise: float, seed: int = 1) -> Path:
    """The checkpoint at ``folder`` with every weight nudged by ``noise`` of its spread, saved to ``out``
    with the same tokenizer: a draft model that often prefers another token than the original, but
    keeps the original's among its best few."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * noise)
    model.save_pretrained(out)
    for file in Path(folder).iterdir():
        if "token" in file.name:
            shutil.copy(file, Path(out) / file.name)
    return Path(out)


def write_adapter(base_folder, out, targets, rank, alpha, rslora, seed):
    """A PEFT adapter with random A and B (``init_lora_weights=False``), as PEFT saves it."""
    from peft import LoraConfig, get_peft_model  # a dev dependency; only the LoRA tests need it

    from reference import load_hf

    torch.manual_seed(seed)
    model = get_peft_model(load_hf(base_folder), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                            use_rslora=rslora, init_lora_weights=False))
    model.save_pretrained(out)
    return str(out)
