"""Stage 03 (radix): a radix tree over token ids remembers which KV pages hold
prefixes already computed. A new prompt reuses the longest cached prefix
(whole pages, locked while in use) and prefill computes only the rest;
finished requests insert their tokens, and least-recently-used unlocked
leaves are evicted when the pool runs short. ``--disable-radix-cache`` turns
it off; ``Engine.flush_cache()`` empties it."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
