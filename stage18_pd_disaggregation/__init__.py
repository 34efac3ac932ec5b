"""Stage 18 (prefill-decode disaggregation): prompts and generation in engines of their own, the K/V handed over.

``--disaggregation-mode prefill`` makes an engine that computes each prompt
and its first token and hands the K/V on; ``--disaggregation-mode decode``
one that reserves pages, asks the prefill engine for the K/V, and generates
the rest (``disaggregation.py``). The K/V goes over torch.distributed point
to point, gloo, one process group per pair of engines met on the prefill
engine's bootstrap port (``kv_transfer.py``). ``--pd-router`` starts the
router that sends every request to a prefill and a decode server
(``pd_router.py``). Everything else is stage 17."""

from .engine import Engine
from .request import GenerateOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
