"""Stage 12's allocator hands pages out in runs of consecutive ids, and falls back to any
free pages when the pool is fragmented."""

import random

import pytest

from stage12_inplace_attention.page_allocator import PageAllocator
from stage12_inplace_attention.page_runs import extend_runs


def runs_of(pages: list[int]) -> list[list[int]]:
    runs = []
    extend_runs(runs, pages)
    return runs


def test_a_request_grows_in_one_run_while_others_grow_beside_it():
    allocator = PageAllocator(1000)
    tables = [allocator.alloc_pages(10, expected=60) for _ in range(8)]  # eight prompts of ten pages
    for _ in range(50):  # then every request grows a page at a time, in turn
        for table in tables:
            table += allocator.alloc_pages(1, after=table[-1])
    assert all(len(runs_of(table)) == 1 for table in tables)


def test_new_runs_start_in_the_middle_of_the_largest_free_stretch():
    allocator = PageAllocator(100)
    assert allocator.alloc_pages(10) == list(range(45, 55))  # centred: room on both sides
    assert allocator.alloc_pages(1)[0] == 22  # the larger stretch left is 0..44 (55..99 is as long, later)


def test_a_fragmented_pool_still_serves_every_page():
    allocator = PageAllocator(64)
    every = allocator.alloc_pages(64)
    allocator.free_pages(every[::2])  # free pages alternate with pages in use
    pages = allocator.alloc_pages(20, expected=40)
    assert len(set(pages)) == 20 and set(pages) <= set(every[::2])
    assert len(runs_of(pages)) == 20  # one-page runs: shorter, never wrong
    assert allocator.num_free == 12
    with pytest.raises(RuntimeError, match="only 12 are free"):
        allocator.alloc_pages(13)


def test_random_alloc_and_free_never_hands_a_page_out_twice():
    rng = random.Random(0)
    allocator, owned = PageAllocator(300), []
    for _ in range(2000):
        if owned and rng.random() < 0.45:
            allocator.free_pages(owned.pop(rng.randrange(len(owned))))
        elif owned and rng.random() < 0.5:  # grow a table after its last page
            table = rng.choice(owned)
            if allocator.num_free:
                table += allocator.alloc_pages(1, after=table[-1])
        else:
            count = rng.randint(1, 20)
            if count <= allocator.num_free:
                owned.append(allocator.alloc_pages(count, expected=rng.randint(0, 40)))
        held = [p for table in owned for p in table]
        assert len(held) == len(set(held)) and set(held) == allocator.in_use
        assert allocator.num_free == 300 - len(held)
        assert all(0 <= p < 300 for p in held)


def test_freeing_a_free_page_is_a_bug_and_changes_nothing():
    allocator = PageAllocator(8)
    pages = allocator.alloc_pages(2)
    allocator.free_pages(pages)
    with pytest.raises(RuntimeError, match="not allocated"):
        allocator.free_pages(pages[:1])
    allocator.alloc_pages(8)
    with pytest.raises(RuntimeError, match="page 3 is freed but was not allocated"):
        allocator.free_pages([1, 3, 3])  # all in use, but page 3 twice
    assert allocator.num_free == 0 and allocator.in_use == set(range(8))
