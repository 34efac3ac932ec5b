"""Stage 10: launching step N+1 before step N's tokens are read changes no output.

The CPU runs every step synchronously, but the overlap schedule is the same
code there: placeholders for tokens the host has not read, requests that
finished in the step in flight, retraction and abort with a step in flight.
Each test checks that the overlap really happened (placeholders were used,
extra tokens were dropped) and that the outputs are stage 09's.
"""

import random

import pytest
import torch

from common.sampling import SamplingParams
from stage10_overlap import Engine
from stage10_overlap.__main__ import build_parser

KINDS = ["dense", "moe", "llama"]
CHUNK = 16  # small chunks: prompt chunks and decodes share steps


def tokens(n, seed):
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompts(count=8, seed=3):
    rng = random.Random(seed)
    return [tokens(rng.randint(2, 40), seed * 100 + i) for i in range(count)]


def greedy(max_tokens, **kwargs):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)


class LaunchLog:
    """Wraps ``runner.launch``: counts the placeholders each step fed and each request's sampled tokens."""

    def __init__(self, engine):
        self.placeholders, self.sampled = 0, {}
        launch = engine.runner.launch

        def logged(requests, new_lengths):
            self.placeholders += sum(r.num_cached + n > len(r.all_ids) for r, n in zip(requests, new_lengths))
            step = launch(requests, new_lengths)
            for i in step.complete:
                self.sampled[requests[i].id] = self.sampled.get(requests[i].id, 0) + 1
            return step

        engine.runner.launch = logged


def assert_no_leak(engine):
    runner, scheduler = engine.runner, engine.scheduler
    engine._drain()  # a step may still be in flight: its requests are finished, its tokens dropped
    assert not scheduler.waiting and not scheduler.running
    assert runner.radix_cache.locked_pages == 0
    engine.flush_cache()
    assert runner.allocator.num_free == runner.allocator.num_pages
    assert len(runner.page_tables.free_rows) == runner.page_tables.table.shape[0]


@pytest.mark.parametrize("kind", KINDS)
def test_overlap_gives_stage09_tokens(kind, engine_for):
    batch = prompts()
    params = [greedy(max_tokens) for max_tokens in (1, 5, 17, 9, 30, 2, 12, 24)]
    expected = [o.token_ids for o in engine_for("stage09_cuda_graph", kind, chunked_prefill_size=CHUNK).generate_batch(batch, params)]
    for overlap in (True, False):
        engine = engine_for("stage10_overlap", kind, chunked_prefill_size=CHUNK, disable_overlap_schedule=not overlap)
        log = LaunchLog(engine)
        assert [o.token_ids for o in engine.generate_batch(batch, params)] == expected
        assert (log.placeholders > 0) == overlap, "with overlap, steps must feed tokens the host has not read"
        # A request ended by max_tokens is never launched again once its last token is pending.
        assert sorted(log.sampled.values()) == sorted(p.max_tokens for p in params)
        assert_no_leak(engine)


def test_stop_rules_never_overshoot(engine_for):
    """Stop tokens and strings are seen a step late; the extra token is dropped, the output is stage 09's."""
    reference = engine_for("stage09_cuda_graph", "dense")
    free = reference.generate(prompts(1)[0], greedy(20))
    stop_string = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    cases = [greedy(20, stop_token_ids=[free.token_ids[3]]), greedy(20, stop=[stop_string]), greedy(7),
             SamplingParams(max_tokens=20, temperature=0)]  # EOS may end it too
    batch = prompts(1) * len(cases)
    expected = reference.generate_batch(batch, cases)
    engine = engine_for("stage10_overlap", "dense")
    log = LaunchLog(engine)
    outputs = engine.generate_batch(batch, cases)
    for out, want in zip(outputs, expected):
        assert (out.token_ids, out.text, out.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    assert outputs[0].finish_reason == outputs[1].finish_reason == "stop"
    # The stopped requests ran one step past their stop: the host saw the stop a step late.
    assert log.sampled[min(log.sampled)] == len(outputs[0].token_ids) + 1
    assert_no_leak(engine)


def test_seeded_sampling_and_penalties_match_stage09(engine_for):
    batch = prompts(4, seed=9)
    params = [SamplingParams(max_tokens=12, temperature=0.8, seed=s, top_k=50, frequency_penalty=0.5 * (s % 2))
              for s in range(len(batch))]
    expected = [o.token_ids for o in engine_for("stage09_cuda_graph", "dense").generate_batch(batch, params)]
    assert [o.token_ids for o in engine_for("stage10_overlap", "dense").generate_batch(batch, params)] == expected


def test_aborts_and_retraction_with_a_step_in_flight_leak_nothing(checkpoints, engine_for):
    """Random arrivals and aborts on a pool small enough to force retraction."""
    rng = random.Random(4)
    reference = engine_for("stage09_cuda_graph", "dense", page_size=4)
    probe = engine_for("stage10_overlap", "dense", page_size=4)
    pool = 24 * probe.runner.pool.bytes_per_page(probe.config, 4, torch.float32)
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=4, kv_cache_bytes=pool,
                chunked_prefill_size=CHUNK) as engine:
        log = LaunchLog(engine)
        submitted, aborted, outputs = {}, set(), {}
        for step in range(150):
            if step < 100:
                for _ in range(rng.choice([0, 1, 1, 2])):
                    prompt, max_tokens = tokens(rng.randint(1, 20), rng.randint(0, 10**6)), rng.randint(1, 30)
                    submitted[engine.add_request(prompt, greedy(max_tokens))] = (prompt, max_tokens)
            running = [rid for rid in submitted if rid not in outputs and rid not in aborted]
            if running and rng.random() < 0.1:
                victim = rng.choice(running)
                engine.abort_request(victim)
                aborted.add(victim)
            engine.step()
            for rid in submitted:
                if rid not in outputs and (out := engine.get_output(rid)) is not None:
                    outputs[rid] = out
        while len(outputs) < len(submitted):
            engine.step()
            outputs.update({rid: out for rid in submitted if rid not in outputs and (out := engine.get_output(rid)) is not None})
        assert engine.scheduler.num_retractions > 0 and aborted and log.placeholders > 0
        for rid, (prompt, max_tokens) in submitted.items():
            if rid in aborted:
                assert outputs[rid].finish_reason in ("abort", "length")  # it may have finished before the abort
            else:
                assert outputs[rid].token_ids == reference.generate(prompt, greedy(max_tokens)).token_ids, rid
        assert_no_leak(engine)


@pytest.mark.distributed
def test_tp2_with_overlap_gives_stage09_tokens(checkpoints, engine_for):
    batch, params = prompts(4, seed=6), greedy(8)
    expected = [o.token_ids for o in engine_for("stage09_cuda_graph", "moe").generate_batch(batch, params)]
    with Engine(model_path=str(checkpoints["moe"]), device="cpu", tp_size=2) as engine:
        assert engine.overlap
        assert [o.token_ids for o in engine.generate_batch(batch, params)] == expected


def test_flag_and_cli(checkpoints):
    assert build_parser().parse_args(["hi", "--disable-overlap-schedule"]).disable_overlap_schedule
    assert not build_parser().parse_args(["hi"]).disable_overlap_schedule
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", disable_overlap_schedule=True) as engine:
        assert not engine.overlap


def test_abort_with_a_token_in_flight_caches_only_read_tokens(engine_for):
    """An abort first reads the step in flight, so the pages handed to the prefix cache are keyed by known tokens."""
    engine = engine_for("stage10_overlap", "dense", page_size=4)
    prompt = tokens(6, 77)
    rid = engine.add_request(prompt, greedy(30))
    request = engine._by_id[rid]
    while not (request.pending_tokens and request.num_cached % 4 == 0):  # in flight, at a page boundary
        engine.step()
    engine.abort_request(rid)
    out = engine.get_output(rid)
    assert out.finish_reason == "abort" and request.pending_tokens == 0
    follow_up = prompt + out.token_ids
    again = engine.generate(follow_up, greedy(5))
    assert again.cached_tokens >= len(follow_up) - 4  # the aborted request's pages were reused
    assert again.token_ids == engine_for("stage09_cuda_graph", "dense", page_size=4).generate(follow_up, greedy(5)).token_ids
    assert_no_leak(engine)


def test_a_request_finished_while_retracted_leaves_the_queue(checkpoints):
    """Retraction can send a request back to the queue with its last token in flight; when that
    token ends it, it must leave the queue rather than be prefilled again."""
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        waiting = engine._by_id[engine.add_request(tokens(5, 1), greedy(3))]
        later = engine._by_id[engine.add_request(tokens(5, 2), greedy(3))]
        waiting.finish_reason = "stop"  # as if the token read after its retraction were a stop token
        engine.scheduler.retire_finished()
        assert list(engine.scheduler.waiting) == [later]
