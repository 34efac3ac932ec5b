"""Stage 15 (multi-LoRA): many LoRA adapters served on one base model, in the same batch.

``lora_paths`` names the PEFT adapters to serve; a request picks one with
``lora_path`` (or the server's ``model`` field). Adapters live in a pool of
``max_loras_per_batch`` slots on the device (``lora_pool.py``, least recently
used slots are reused); each projection adds its rows' own ``B A x`` to the
base output (``lora_layers.py``: dense, grouped or gather-bmm), and the
prefix cache keys each prompt by its adapter. Requests without an adapter
are computed exactly as in stage 14. Everything else is stage 14."""

from .engine import Engine
from .request import GenerateOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
