"""Stage 09 (cuda_graph): decode steps replay captured CUDA graphs.
At start-up (CUDA, bf16/fp16) the decode forward is recorded once per batch
bucket (1, 2, 4, 8, 16, 24, ... ``--cuda-graph-max-bs``); a decode step then
fills fixed input buffers and replays its bucket's graph, one launch instead
of ~700. Prefill, mixed and oversized steps run eagerly, as in stage 08.
``--disable-cuda-graph`` turns it off; on the CPU the stage runs as stage 08."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
