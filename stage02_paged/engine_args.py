"""The engine's settings, in one place: ``Engine(**kwargs)`` builds them, the command line is made from them.

Each field is a flag (``--context-length``), an ``Engine`` keyword
(``context_length=``) and its checks, written once (common/settings.py says
how). The names are SGLang's (its ``ServerArgs``). Each later stage adds the
fields of its technique here.
"""

import dataclasses

import torch

from common.settings import Settings, positive, setting

from .attention_backend import ATTENTION_BACKENDS, default_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class EngineArgs(Settings):
    model_path: str | None = setting(None, "checkpoint folder, .gguf file or hub id (default: built-in SmolLM2-135M)")
    device: str | torch.device | None = setting(None, "cpu or cuda (default: cuda when present)")
    dtype: str | torch.dtype | None = setting(
        None, "weights and activations (default: float32 on cpu, bfloat16 on cuda)", choices=list(DTYPES))
    context_length: int | None = setting(None, "longest prompt plus output (default: the model's)", check=positive)
    seed: int | None = setting(None, "seed for requests that bring none")
    page_size: int = setting(16, "tokens per KV page", check=positive)
    kv_cache_bytes: int | None = setting(None, "KV pool size (default: 512 MiB on CPU, 80% of free GPU memory)",
                                         check=positive)
    attention_backend: str | None = setting(None, "how attention reads the paged KV pool (default: the best for the "
                                                  "device)", choices=ATTENTION_BACKENDS)

    def validate(self) -> None:
        self.device = resolve_device(self.device)
        self.attention_backend = self.attention_backend or default_backend(self.device)
        self.dtype = DTYPES.get(self.dtype, self.dtype)
        if self.dtype not in (None, *DTYPES.values()):
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or "auto" picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device torch knows; use 'cpu' or 'cuda'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    return device
