"""Read a PEFT LoRA adapter from its folder, checked against the base model.

A LoRA adapter changes a projection ``y = W x`` into ``y = W x + s * B (A x)``:
``A [r, in]`` shrinks the input to ``r`` numbers, ``B [out, r]`` expands them
back, and ``s`` is the adapter's scale (``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA). ``r`` is small (8, 16, 64), so an
adapter is a few megabytes where the base is gigabytes, and many fine-tunes
can share one base model.

PEFT saves ``adapter_config.json`` and ``adapter_model.safetensors`` with
tensors named like the base model's modules:
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``.
``LoRAAdapter`` reads them onto the host, folds the scale into ``B``, and
keeps this rank's slice when the model is split (tensor parallelism cuts
``B`` with a column-parallel layer's output rows and ``A`` with a
row-parallel layer's input columns, exactly as the base weight is cut).
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.config import ModelConfig

# The projections an adapter may change, and the fused module of the model that runs each.
TARGET_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
                  "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
ROW_PARALLEL = ("o_proj", "down_proj")  # their input is split across ranks (see parallel.py)
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoRAAdapter:
    """One adapter on the host: ``parts[(layer, projection)] = (A [r, in], s * B [out, r])``."""

    def __init__(self, name: str, path: str | Path, config: ModelConfig, read_slice=None):
        self.name, self.path = name, str(path)
        folder = Path(path).expanduser()
        config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise ValueError(f"LoRA adapter {name!r}: {folder} has no adapter_config.json and "
                             "adapter_model.safetensors (a folder PEFT's save_pretrained writes)")
        settings = json.loads(config_file.read_text())
        self._check_settings(settings)
        tensors = load_file(str(weights_file))
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.search(key)
            if match is None or match.group(3) not in TARGET_MODULES:
                raise ValueError(f"LoRA adapter {name!r}: tensor {key} is not a LoRA weight of a projection this "
                                 f"engine adapts ({', '.join(TARGET_MODULES)})")
            layer, block, projection, which = int(match.group(1)), match.group(2), match.group(3), match.group(4)
            if layer >= config.num_hidden_layers:
                raise ValueError(f"LoRA adapter {name!r}: tensor {key} is for layer {layer}; the model has "
                                 f"{config.num_hidden_layers}")
            if block == "mlp" and config.is_moe_layer(layer):
                raise ValueError(f"LoRA adapter {name!r}: tensor {key} adapts a mixture-of-experts block; "
                                 "adapters may change the attention projections of MoE layers only")
            pairs.setdefault((layer, projection), {})[which] = tensor
        self.parts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.rank = 0
        for (layer, projection), pair in sorted(pairs.items()):
            if set(pair) != {"A", "B"}:
                raise ValueError(f"LoRA adapter {name!r}: layer {layer} {projection} has lora_{next(iter(pair))} "
                                 "without its partner")
            a, b = pair["A"].float(), pair["B"].float()
            expected_out, expected_in = _shape(config, projection)
            r = a.shape[0]
            if a.shape != (r, expected_in) or b.shape != (expected_out, r):
                raise ValueError(f"LoRA adapter {name!r}: layer {layer} {projection} has A {tuple(a.shape)} and "
                                 f"B {tuple(b.shape)}; this model needs A [r, {expected_in}] and B "
                                 f"[{expected_out}, r]: the adapter was trained for another model")
            scale = settings["lora_alpha"] / (math.sqrt(r) if settings.get("use_rslora") else r)
            b = b * scale  # folded once here, so serving does two matmuls and no multiply
            if read_slice is not None:  # tensor parallelism: this rank's slice, cut like the base weight
                base_name = f"model.layers.{layer}.{block}.{projection}.weight"
                a, b = (read_slice(base_name, a), b) if projection in ROW_PARALLEL else (a, read_slice(base_name, b))
            self.parts[(layer, projection)] = (a.contiguous(), b.contiguous())
            self.rank = max(self.rank, r)
        if not self.parts:
            raise ValueError(f"LoRA adapter {name!r}: {weights_file} holds no LoRA weights")
        self.target_modules = sorted({projection for _, projection in self.parts})

    @staticmethod
    def _check_settings(settings: dict) -> None:
        """Refuse the PEFT options whose math this engine does not run (rather than serve them wrong)."""
        if settings.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter type {settings['peft_type']!r} is not LoRA")
        unsupported = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "alpha_pattern": "alpha_pattern",
                       "fan_in_fan_out": "fan_in_fan_out"}
        for key, what in unsupported.items():
            if settings.get(key):
                raise ValueError(f"LoRA adapter uses {what}, which this engine does not serve")
        if settings.get("bias", "none") != "none":
            raise ValueError(f"LoRA adapter trains biases (bias={settings['bias']!r}); only bias='none' is served")
        if "lora_alpha" not in settings:
            raise ValueError("adapter_config.json has no lora_alpha")


def _shape(config: ModelConfig, projection: str) -> tuple[int, int]:
    """(out, in) features of a projection in the whole (unsplit) model."""
    hidden, d = config.hidden_size, config.head_dim
    q, kv, inter = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}[projection]


def adapter_folders(lora_paths, max_lora_rank) -> dict[str, str] | None:
    """The adapters to serve as {name: folder}.

    ``lora_paths`` is a dict, or SGLang's command-line form: a list of
    ``name=path`` (or a bare path, which is also its name).
    """
    if lora_paths is None:
        return None
    if isinstance(lora_paths, (list, tuple)):
        pairs = [item.split("=", 1) if isinstance(item, str) and "=" in item else [item, item] for item in lora_paths]
        lora_paths = dict(pairs)
    if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in lora_paths.items()):
        raise ValueError("lora_paths must map adapter names to folders ({name: path}, or a list of 'name=path')")
    if not lora_paths and max_lora_rank is None:
        raise ValueError("lora_paths is empty: give adapters, or max_lora_rank to load them later")
    return lora_paths
