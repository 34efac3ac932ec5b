"""Stage 19 (pipeline parallelism): the model's layers split into consecutive groups, one per rank, micro-batches in flight, the full system.

``--pp-size P`` gives each of P pipeline ranks a run of whole layers and its
own KV pool for them (``--pp-layer-partition`` to choose the split); rank 0
embeds and samples, the last rank computes the logits, and the activations
go rank to rank with torch.distributed point to point (``pipeline.py``).
Rank 0 keeps ``--pp-async-batch-depth`` micro-batches in flight, so every
rank computes at once. With ``--tp-size`` each pipeline rank is a
tensor-parallel group. Everything else is stage 18."""

from .engine import Engine
from .request import GenerateOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
