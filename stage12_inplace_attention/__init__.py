"""Stage 12 (in-place attention): decode attention reads the keys where they lie in the KV pool.

Each run of consecutive pages in a request's page table is one sequence of
the flash kernel, read in place; the runs' partial results are merged by
their log-sum-exps (``page_runs.py``). The allocator hands a request its pages
in runs, so a request is usually one run (``page_allocator.py``).
``--attention-backend gather`` keeps stage 11's packed copy for comparison.
Everything else is stage 11: ``python -m stage12_inplace_attention --serve``
serves the OpenAI API."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
