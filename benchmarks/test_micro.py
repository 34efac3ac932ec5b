"""Micro benchmarks of the memory-management pieces (pytest-benchmark; not part of the test suite).

    python -m pytest -n0 benchmarks/test_micro.py --benchmark-only
"""

import random

from stage03_radix.page_allocator import PageAllocator
from stage03_radix.radix_cache import RadixCache


def test_alloc_and_free_1000_pages(benchmark):
    allocator = PageAllocator(4096)

    def cycle():
        pages = [allocator.alloc_pages(8) for _ in range(125)]
        for p in pages:
            allocator.free_pages(p)

    benchmark(cycle)


def _radix_with_prompts(count=200, shared=512, page_size=16):
    rng = random.Random(0)
    allocator = PageAllocator(100_000)
    cache = RadixCache(allocator, page_size)
    system = [rng.randrange(50_000) for _ in range(shared)]
    prompts = [system[: rng.choice([0, 256, 512])] + [rng.randrange(50_000) for _ in range(256)] for _ in range(count)]
    for prompt in prompts:
        prompt = prompt[: len(prompt) // page_size * page_size]
        pages = allocator.alloc_pages(len(prompt) // page_size)
        already = cache.insert(prompt, pages) // page_size
        allocator.free_pages(pages[:already])
    return cache, prompts


def test_radix_match_prefix_of_200_cached_prompts(benchmark):
    cache, prompts = _radix_with_prompts()
    benchmark(lambda: [cache.match_prefix(p) for p in prompts])


def test_radix_insert_200_prompts(benchmark):
    benchmark.pedantic(_radix_with_prompts, rounds=5)
