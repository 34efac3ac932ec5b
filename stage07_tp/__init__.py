"""Stage 07 (tp): tensor parallelism. ``--tp-size N`` splits every large weight
matrix across N processes (gloo on CPU, NCCL on GPUs, one GPU per rank):
column-parallel q/k/v/gate/up, row-parallel o/down with an all-reduce,
vocab-parallel embedding and lm_head. Each rank reads only its slices of the
checkpoint. This process is rank 0: it schedules, broadcasts each step's
batch, and samples from the gathered logits. The ranks may span machines
(``--nnodes``, ``--node-rank``, ``--dist-init-addr``)."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
