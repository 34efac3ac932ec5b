"""Stage 01 (core): load a Qwen3 checkpoint, tokenize, run the forward pass,
sample, and generate one prompt, a batch or a stream. Each request keeps its
keys and values in a contiguous buffer sized for its longest possible life.
Every later stage is this engine plus one serving technique."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
