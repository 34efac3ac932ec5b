"""Stage 04: requests join and leave every step; retraction and abort.

The randomized storm every batching stage runs is in tests/ladder/test_request_storm.py."""

import threading

import pytest
import torch

from common.sampling import SamplingParams
from stage04_batching import Engine

PAGE = 4


def tokens(n, seed):
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """Stage 03, one request at a time: the tokens every schedule must reproduce."""
    from stage03_radix import Engine as Stage03

    with Stage03(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE) as engine:
        memo = {}

        def expected(prompt, max_tokens):
            key = (tuple(prompt), max_tokens)
            if key not in memo:
                memo[key] = engine.generate(prompt, greedy(max_tokens)).token_ids
            return memo[key]

        yield expected


def page_bytes(engine):
    return engine.runner.pool.bytes_per_page(engine.config, PAGE, torch.float32)


def make_engine(checkpoints, num_pages=None, **kwargs):
    engine = Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE, **kwargs)
    if num_pages is not None:  # rebuild with a pool of exactly num_pages pages
        size = page_bytes(engine) * num_pages
        engine.shutdown()
        engine = Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE, kv_cache_bytes=size, **kwargs)
    return engine


def assert_no_leak(engine):
    runner, scheduler = engine.runner, engine.scheduler
    assert not scheduler.waiting and not scheduler.running
    assert runner.radix_cache.locked_pages == 0
    assert runner.allocator.num_free + runner.radix_cache.total_pages == runner.allocator.num_pages
    engine.flush_cache()
    assert runner.allocator.num_free == runner.allocator.num_pages


def drain(engine, ids):
    outputs = {}
    while len(outputs) < len(ids):
        engine.step()
        for rid in ids:
            if rid not in outputs and (out := engine.get_output(rid)) is not None:
                outputs[rid] = out
    return outputs


def test_requests_join_while_others_decode(checkpoints, reference):
    with make_engine(checkpoints) as engine:
        first = engine.add_request(tokens(9, 1), greedy(12))
        for _ in range(4):
            engine.step()  # the first request is decoding now
        assert len(engine.scheduler.running) == 1 and engine.scheduler.running[0].output_ids
        later = [engine.add_request(tokens(n, n), greedy(6)) for n in (3, 20, 7)]
        batches = []
        original = engine.runner.step
        engine.runner.step = lambda batch: batches.append(len(batch)) or original(batch)
        outputs = drain(engine, [first] + later)
        assert max(batches) == 4, "the late requests must decode in the same batch as the first"
        assert outputs[first].token_ids == reference(tokens(9, 1), 12)
        for rid, n in zip(later, (3, 20, 7)):
            assert outputs[rid].token_ids == reference(tokens(n, n), 6)
        assert_no_leak(engine)


def test_prefill_and_decode_batches_alternate_with_a_prefill_budget(checkpoints, reference):
    with make_engine(checkpoints, max_prefill_tokens=16) as engine:
        prompts = [tokens(n, 100 + n) for n in (10, 10, 10, 30)]
        kinds = []
        original = engine.runner.step
        engine.runner.step = lambda batch: kinds.append([r.seq_len - r.num_cached for r in batch]) or original(batch)
        outputs = engine.generate_batch(prompts, greedy(5))
        # A 16-token budget admits one 10-token prompt at a time; the 30-token one goes alone.
        prefills = [k for k in kinds if max(k) > 1]
        assert all(sum(k) <= 16 or len(k) == 1 for k in prefills) and len(prefills) == 4
        assert [o.token_ids for o in outputs] == [reference(p, 5) for p in prompts]
        assert_no_leak(engine)


def test_a_small_pool_forces_retraction_and_every_request_still_finishes_correctly(checkpoints, reference):
    prompts = [tokens(n, 200 + i) for i, n in enumerate([6, 9, 3, 12, 7, 5])]
    with make_engine(checkpoints, num_pages=14) as engine:
        outputs = engine.generate_batch(prompts, greedy(24))
        assert engine.scheduler.num_retractions > 0
        assert [o.token_ids for o in outputs] == [reference(p, 24) for p in prompts]
        assert all(o.finish_reason == "length" for o in outputs)
        assert_no_leak(engine)


def test_abort_by_id_releases_pages_and_others_continue(checkpoints, reference):
    with make_engine(checkpoints) as engine:
        keep = engine.add_request(tokens(8, 3), greedy(10))
        drop = engine.add_request(tokens(8, 4), greedy(50))
        for _ in range(3):
            engine.step()
        engine.abort_request(drop)
        out = drain(engine, [keep, drop])
        assert out[drop].finish_reason == "abort" and len(out[drop].token_ids) < 50
        assert out[keep].token_ids == reference(tokens(8, 3), 10)
        assert_no_leak(engine)


def test_abort_a_waiting_request(checkpoints):
    with make_engine(checkpoints) as engine:
        rid = engine.add_request(tokens(8, 5), greedy(10))
        engine.abort_request(rid)
        assert engine.get_output(rid).finish_reason == "abort"
        assert_no_leak(engine)
        with pytest.raises(ValueError, match="no request with id"):
            engine.abort_request(rid)


def test_abandoning_a_stream_aborts_its_request(checkpoints):
    with make_engine(checkpoints) as engine:
        stream = engine.generate_stream(tokens(10, 6), greedy(40))
        next(stream)
        stream.close()
        assert_no_leak(engine)


def test_concurrent_streams_share_the_loop(checkpoints, reference):
    prompts = [tokens(n, 300 + n) for n in (4, 11, 17)]
    with make_engine(checkpoints) as engine:
        results, batch_sizes = {}, []
        original = engine.runner.step
        engine.runner.step = lambda batch: batch_sizes.append(len(batch)) or original(batch)

        def consume(i):
            results[i] = "".join(engine.generate_stream(prompts[i], greedy(30)))

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, prompt in enumerate(prompts):
            assert results[i] == engine.tokenizer.decode(reference(prompt, 30))
        assert max(batch_sizes) > 1, "streams from different threads should share decode steps"
        assert_no_leak(engine)
