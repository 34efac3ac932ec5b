"""Stage 03 end to end: prefixes are reused, tokens stay stage02's, and pages all come back."""

import pytest
import torch

from stage03_radix import Engine

GREEDY = dict(temperature=0, ignore_eos=True, max_tokens=8)
PAGE = 4


def tokens(n, seed):
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = tokens(24, 0)
PROMPTS = {
    "no shared prefix": [tokens(10, 1), tokens(13, 2)],
    "shared within a page": [SYSTEM[:2] + tokens(9, 3), SYSTEM[:2] + tokens(7, 4)],
    "shared exactly a page": [SYSTEM[:PAGE] + tokens(6, 5), SYSTEM[:PAGE] + tokens(11, 6)],
    "long shared prefix": [SYSTEM + tokens(5, 7), SYSTEM + tokens(9, 8), SYSTEM[:13] + tokens(3, 9)],
    "repeated prompt": [SYSTEM + tokens(5, 7)] * 3,
    "interleaved prefixes": [SYSTEM + [1], tokens(20, 10) + [2], SYSTEM + [3], tokens(20, 10) + [4]],
    "prompt inside a cached one": [SYSTEM, SYSTEM[:9], SYSTEM[:PAGE + 1]],
}


@pytest.fixture(scope="module")
def engines(checkpoints):
    """A stage03 engine with the cache, and stage02 as the reference."""
    from stage02_paged import Engine as Stage02

    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE) as cached, \
            Stage02(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE) as reference:
        yield cached, reference


def assert_all_pages_free(engine):
    engine.flush_cache()
    runner = engine.runner
    assert runner.allocator.num_free == runner.allocator.num_pages
    assert runner.radix_cache.total_pages == runner.radix_cache.locked_pages == 0


@pytest.mark.parametrize("case", PROMPTS, ids=list(PROMPTS))
def test_same_tokens_as_stage02_one_request_after_another(case, engines):
    cached, reference = engines
    for prompt in PROMPTS[case]:
        assert cached.generate(prompt, **GREEDY).token_ids == reference.generate(prompt, **GREEDY).token_ids
    assert_all_pages_free(cached)


def test_same_tokens_as_stage02_in_batches_that_hit_the_cache(engines):
    cached, reference = engines
    everything = [p for case in PROMPTS.values() for p in case]
    for _ in range(2):  # the second round finds every prompt cached
        ours = cached.generate_batch(everything, **GREEDY)
        assert [o.token_ids for o in ours] == [o.token_ids for o in reference.generate_batch(everything, **GREEDY)]
    assert all(o.cached_tokens > 0 for o in ours if o.prompt_tokens > PAGE)
    assert_all_pages_free(cached)


def test_cached_tokens_counts_the_reused_whole_pages(engines):
    cached, _ = engines
    prompt = SYSTEM + tokens(6, 11)  # 30 tokens
    assert cached.generate(prompt, **GREEDY).cached_tokens == 0
    assert cached.generate(prompt, **GREEDY).cached_tokens == 28  # 29 (all but the last) rounded down to pages
    assert cached.generate(SYSTEM[:10] + [7, 7], **GREEDY).cached_tokens == 8
    assert_all_pages_free(cached)


def test_generated_tokens_are_cached_for_the_next_turn(engines):
    """A multi-turn chat sends the previous prompt + answer back: that whole prefix is reused."""
    cached, _ = engines
    first = cached.generate(SYSTEM, **GREEDY)
    follow_up = SYSTEM + first.token_ids + tokens(3, 12)
    assert cached.generate(follow_up, **GREEDY).cached_tokens == (len(SYSTEM) + GREEDY["max_tokens"] - 1) // PAGE * PAGE
    assert_all_pages_free(cached)


def test_eviction_under_pressure_keeps_tokens_correct(checkpoints, engines):
    """A pool of 20 pages: every new prompt must evict older prefixes, and tokens stay right."""
    _, reference = engines
    page_bytes = reference.runner.pool.bytes_per_page(reference.config, PAGE, torch.float32)
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE, kv_cache_bytes=20 * page_bytes) as small:
        for case in PROMPTS.values():
            for prompt in case:
                assert small.generate(prompt, **GREEDY).token_ids == reference.generate(prompt, **GREEDY).token_ids
                assert small.runner.radix_cache.locked_pages == 0
        assert small.runner.allocator.num_free + small.runner.radix_cache.total_pages == 20
        assert_all_pages_free(small)


def test_disable_radix_cache_falls_back_to_stage02(checkpoints, engines):
    _, reference = engines
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE, disable_radix_cache=True) as plain:
        for _ in range(2):
            out = plain.generate(SYSTEM, **GREEDY)
            assert out.cached_tokens == 0 and out.token_ids == reference.generate(SYSTEM, **GREEDY).token_ids
        assert plain.runner.radix_cache is None and plain.runner.allocator.num_free == plain.runner.allocator.num_pages


def test_an_abandoned_stream_leaves_no_lock_behind(engines):
    cached, _ = engines
    cached.generate(SYSTEM, **GREEDY)
    stream = cached.generate_stream(SYSTEM + [5], max_tokens=20, temperature=0, ignore_eos=True)
    next(stream)
    assert cached.runner.radix_cache.locked_pages > 0
    stream.close()
    assert cached.runner.radix_cache.locked_pages == 0
    assert_all_pages_free(cached)
