"""Stage 02 (paged): the KV cache becomes one preallocated pool of fixed-size
pages. A page allocator hands pages to requests as their sequences grow and
takes them all back when they finish; attention reads keys and values
through each request's page table. Memory follows the tokens in use, and the
pool size, not any request's maximum length, bounds what can be cached."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
