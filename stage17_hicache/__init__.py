"""Stage 17 (hierarchical cache): prefixes evicted from the device pool go to host memory and files, and come back.

``--enable-hierarchical-cache`` puts two tiers under the radix tree: a host
pool (``--hicache-ratio`` times the device pool, or ``--hicache-size`` GB)
and, with ``--hicache-storage-backend file``, one checked file per page. A
prefix the device pool evicts is copied down instead of forgotten
(``--hicache-write-policy``: on eviction, when cached, or once hit twice);
a request whose prompt matches it has its pages loaded back, in one gathered
copy, instead of computing them again (``hiradix_cache.py``,
``cache_controller.py``). Everything else is stage 16."""

from .engine import Engine
from .request import GenerateOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
