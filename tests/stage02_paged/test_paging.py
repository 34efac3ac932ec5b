"""Stage 02: the paged KV pool gives stage01's tokens, and pages are accounted exactly."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stage02_paged import Engine
from stage02_paged.page_allocator import PageAllocator
from test_parity import mixed_prompts

KINDS = ["dense", "moe", "llama"]
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def stage01_tokens(engine_for):
    """kind -> stage01's greedy tokens for the mixed prompts."""
    return {
        kind: [o.token_ids for o in engine_for("stage01_core", kind).generate_batch(mixed_prompts(), max_tokens=10, **GREEDY)]
        for kind in KINDS
    }


def watch_pages(engine):
    """Check after every forward step that page tables match sequence lengths and nothing leaks."""
    runner, original = engine.runner, engine.runner.step
    peaks = []

    def checked_step(requests):
        tokens = original(requests)
        for r in requests:
            assert len(r.page_table) == math.ceil(r.num_cached / runner.page_size) and r.num_cached == r.seq_len
        tables = [p for r in requests for p in r.page_table]
        assert len(tables) == len(set(tables)), "a page is shared by two requests"
        assert set(tables) == runner.allocator.in_use, "pages in use that no running request owns"
        peaks.append(len(tables))
        return tokens

    runner.step = checked_step
    return peaks


@pytest.mark.parametrize("page_size", [1, 16, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_same_tokens_as_stage01_for_any_page_size(kind, page_size, checkpoints, stage01_tokens):
    with Engine(model_path=str(checkpoints[kind]), device="cpu", page_size=page_size) as engine:
        watch_pages(engine)
        outputs = engine.generate_batch(mixed_prompts(), max_tokens=10, **GREEDY)
        assert [o.token_ids for o in outputs] == stage01_tokens[kind]
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages


def test_memory_follows_tokens_in_use_not_max_length(checkpoints):
    """Pages in use track current lengths: far below what max_tokens would reserve up front."""
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=4) as engine:
        peaks = watch_pages(engine)
        engine.generate_batch([[5] * 8, [6] * 8], [dict_params(40), dict_params(4)])
    assert peaks[0] == 2 * math.ceil(8 / 4)  # after prefill: only the prompts' pages
    assert max(peaks) < math.ceil(48 / 4) + math.ceil(12 / 4)  # never the worst case of both at once


def dict_params(max_tokens):
    from common.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, **GREEDY)


def test_a_small_pool_makes_requests_wait_not_fail(checkpoints, stage01_tokens, engine_for):
    """Room for about one request at a time: the others wait for pages and still match stage01."""
    pool_bytes = engine_for("stage02_paged", "dense").runner.pool.bytes_per_page(
        engine_for("stage02_paged", "dense").config, 4, torch.float32) * 16
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=4, kv_cache_bytes=pool_bytes) as engine:
        peaks = watch_pages(engine)
        outputs = engine.generate_batch(mixed_prompts(), max_tokens=10, **GREEDY)
        assert [o.token_ids for o in outputs] == stage01_tokens["dense"]
        assert max(peaks) <= 16 and engine.runner.allocator.num_free == 16


def test_a_request_larger_than_the_pool_is_refused_and_the_engine_still_serves(checkpoints):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=4, kv_cache_bytes=8 * 4 * 512) as engine:
        assert engine.runner.allocator.num_pages == 8
        with pytest.raises(ValueError, match="needs 9 KV pages of 4 tokens.*pool has 8"):
            engine.generate([5] * 30, max_tokens=6)
        assert engine.generate([5] * 4, max_tokens=4, **GREEDY).completion_tokens == 4
        assert engine.runner.allocator.num_free == 8


def test_pages_come_back_when_a_stream_is_abandoned(checkpoints):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        stream = engine.generate_stream("hello there", max_tokens=30, **GREEDY)
        next(stream)
        assert engine.runner.allocator.num_free < engine.runner.allocator.num_pages
        stream.close()
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages


def test_bad_page_size_and_tiny_pool_are_refused(checkpoints):
    with pytest.raises(ValueError, match="page_size"):
        Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=0)
    with pytest.raises(ValueError, match="smaller than one page"):
        Engine(model_path=str(checkpoints["dense"]), device="cpu", kv_cache_bytes=10)


# ----- the allocator on its own (property tests) -------------------------------------------

operations = st.lists(st.tuples(st.sampled_from(["alloc", "free"]), st.integers(0, 6)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(num_pages=st.integers(1, 20), ops=operations)
def test_allocator_never_hands_out_a_page_twice_and_gets_every_page_back(num_pages, ops):
    allocator = PageAllocator(num_pages)
    owned: list[list[int]] = []
    for op, n in ops:
        if op == "alloc":
            if n <= allocator.num_free:
                owned.append(allocator.alloc_pages(n))
            else:
                with pytest.raises(RuntimeError):
                    allocator.alloc_pages(n)
        elif owned:
            allocator.free_pages(owned.pop(n % len(owned)))
        held = [p for pages in owned for p in pages]
        assert len(held) == len(set(held)) and set(held) == allocator.in_use
        assert allocator.num_free + len(held) == num_pages
        assert all(0 <= p < num_pages for p in held)
    for pages in owned:
        allocator.free_pages(pages)
    assert sorted(allocator.free_list) == list(range(num_pages))


def test_freeing_a_page_twice_is_caught():
    allocator = PageAllocator(4)
    pages = allocator.alloc_pages(2)
    allocator.free_pages(pages)
    with pytest.raises(RuntimeError, match="not allocated"):
        allocator.free_pages(pages[:1])
