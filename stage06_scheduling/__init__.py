"""Stage 06 (scheduling): ``--schedule-policy`` picks the order in which waiting
requests are admitted: cache-aware ``lpm`` and ``dfs-weight``, or ``fcfs``,
``lof`` and ``random``. Running requests hand their computed pages to the
prefix cache as they go, and a request that shares a long uncached prefix
with one just admitted waits a step to reuse it instead of computing it
again (in-batch prefix sharing). A request waiting too long jumps every policy."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
