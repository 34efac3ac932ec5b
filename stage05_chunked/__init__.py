"""Stage 05 (chunked): chunked prefill mixed with decode. Each step is one
forward carrying one new token of every running request plus up to
``--chunked-prefill-size`` prompt tokens; a longer prompt is prefilled chunk
by chunk across steps, keeping its place and its pages in between. A long
prompt no longer stalls the running requests, and no forward holds
activations for more than a chunk."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
