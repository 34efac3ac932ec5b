"""Stage 08 (ep): expert parallelism for Qwen3-MoE.
``--ep-size N`` puts expert e of every MoE layer on rank e // (E/N) only; the
router runs on every rank, each rank computes the tokens routed to its own
experts, and an all-reduce combines them. Attention and dense layers stay as
in stage 07 (tensor-parallel with ``--tp-size N``, or replicated).
``Engine.expert_token_counts()`` shows how evenly tokens spread."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
