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
from .schedule_policy import POLICIES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def chunk_size(value: int) -> str | None:
    return None if value >= 1 or value == -1 else "must be a positive integer, or -1 for no chunking"


def default_chunked_prefill_size(device: torch.device) -> int:
    """Prompt tokens per step when the settings name none, sized from the device as SGLang does:
    2,048 on the CPU and on GPUs under 24 GiB, doubling with the GPU's memory to 16,384 from 72 GiB
    (on an H100, 16,384 served nano-vllm's 256 requests 1.17x faster than 2,048, and kept the p99
    time between tokens near its median: mixed steps are fewer)."""
    if device.type != "cuda":
        return 2048
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return 2048 if gib < 24 else 4096 if gib < 48 else 8192 if gib < 72 else 16384


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
    disable_radix_cache: bool = setting(False, "do not reuse cached prompt prefixes")
    max_prefill_tokens: int = setting(16384, "token budget of one prefill batch", check=positive)
    chunked_prefill_size: int | None = setting(None, "prompt tokens per step (default: from the device's memory; -1: no "
                                                     "chunking)", check=chunk_size)
    schedule_policy: str = setting("fcfs", "which waiting request goes first", choices=POLICIES)

    def validate(self) -> None:
        self.device = resolve_device(self.device)
        self.attention_backend = self.attention_backend or default_backend(self.device)
        self.dtype = DTYPES.get(self.dtype, self.dtype)
        if self.dtype not in (None, *DTYPES.values()):
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        self.chunked_prefill_size = self.chunked_prefill_size or default_chunked_prefill_size(self.device)


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
