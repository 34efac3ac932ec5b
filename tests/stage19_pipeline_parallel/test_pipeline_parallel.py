"""Stage 19: the layers split across pipeline ranks, micro-batches in flight.

The oracle is the same engine with one rank (greedy tokens, fp32, gloo on the
CPU): pp 2, an uneven split and pp 2 x tp 2 must give its tokens, for dense
and MoE models, with chunked prefill and prefix-cache hits. The technique's
own invariants: with two micro-batches in flight both ranks compute at once
(their forwards overlap in time; with one in flight they never do), a storm
with aborts leaks no page, and a worker that dies, raises or hangs ends the engine's
requests with an error in bounded time.
"""

import os
import random
import signal

import pytest
import torch

from stage19_pipeline_parallel import Engine, SamplingParams
from stage19_pipeline_parallel.parallel import WorkerFailure
from stage19_pipeline_parallel.pipeline import layer_partition
from worker_faults import faulty_worker_group

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def prompts(seed: int = 0, count: int = 6) -> list[list[int]]:
    """Prompts of many lengths; the second half shares a 40-token prefix with the first."""
    rng = random.Random(seed)
    first = [[rng.randrange(3, 1000) for _ in range(rng.randint(3, 70))] for _ in range(count // 2)]
    return first + [first[0][:40] + [rng.randrange(3, 1000) for _ in range(rng.randint(1, 20))] for _ in first]


@pytest.fixture(scope="module")
def expected(checkpoints):
    """The tokens of one rank, per model kind: each prompt batch, then the shared-prefix batch."""
    out = {}
    for kind in ("dense", "moe"):
        with Engine(model_path=str(checkpoints[kind]), device="cpu", chunked_prefill_size=32) as engine:
            out[kind] = [[o.token_ids for o in engine.generate_batch(prompts(seed), GREEDY)] for seed in (0, 1)]
    return out


def generate(engine, seed: int):
    return engine.generate_batch(prompts(seed), GREEDY)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_pp2_gives_one_ranks_tokens_with_chunks_and_prefix_hits(kind, checkpoints, expected):
    with Engine(model_path=str(checkpoints[kind]), device="cpu", chunked_prefill_size=32, pp_size=2) as engine:
        first = generate(engine, 0)
        second = generate(engine, 1)  # its prompts share prefixes with the first batch's, now cached
        assert [o.token_ids for o in first] == expected[kind][0]
        assert [o.token_ids for o in second] == expected[kind][1]
        assert sum(o.cached_tokens for o in second) >= 32, "the prefix cache served the second batch"
        layers = engine.config.num_hidden_layers
        assert engine.runner.pool.k.shape[0] == layers - layers // 2  # rank 0 pools its own layers only


def test_layers_split_evenly_or_as_asked():
    assert layer_partition(28, 3) == [range(10), range(10, 19), range(19, 28)]  # earlier ranks take the extra
    assert layer_partition(28, 2, [4, 24]) == [range(4), range(4, 28)]
    with pytest.raises(ValueError, match="at least one layer, 28 in all"):
        layer_partition(28, 2, [0, 28])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_pp2_tp2_gives_the_same_tokens(kind, checkpoints, expected):
    with Engine(model_path=str(checkpoints[kind]), device="cpu", chunked_prefill_size=32, pp_size=2,
                tp_size=2) as four:
        assert len(four.workers.processes) == 3
        assert [o.token_ids for o in generate(four, 0)] == expected[kind][0]


def test_max_micro_batch_size_caps_each_micro_batchs_decodes(checkpoints, expected):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", chunked_prefill_size=32, pp_size=2,
                pp_max_micro_batch_size=2) as engine:
        sizes, real = [], engine.scheduler.next_batch

        def recording(*args):
            batch, new_lengths = real(*args)
            sizes.append(sum(n == 1 for n in new_lengths))  # the micro-batch's decodes
            return batch, new_lengths

        engine.scheduler.next_batch = recording
        assert [o.token_ids for o in generate(engine, 0)] == expected["dense"][0]
        assert max(sizes) == 2  # six requests decode, two (at most) a micro-batch


def overlaps(timeline) -> int:
    """How many of rank 0's forwards overlap a forward of the last rank."""
    mine = [(a, b) for who, a, b in timeline if who == "rank 0"]
    theirs = [(a, b) for who, a, b in timeline if who == "last"]
    return sum(any(a < d and c < b for c, d in theirs) for a, b in mine)


def test_two_micro_batches_in_flight_keep_both_ranks_busy_at_once(builtin_folder):
    """On the built-in model (30 layers, 15 a rank), a forward takes long enough beside the host's
    work between micro-batches that the overlap shows even on a busy machine."""
    many = [[5 + i, 6, 7] for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with Engine(model_path=str(builtin_folder), device="cpu", pp_size=2) as engine:  # (one engine: ranks cost seconds)
        depth, timeline = engine.pp_depth, engine.runner.links.timeline
        engine.pp_depth = 1  # as --pp-async-batch-depth 1
        engine.generate_batch(many, params)
        assert overlaps(timeline) == 0  # one in flight: each rank waits for the other
        timeline.clear()
        engine.flush_cache()  # the same prompts computed again, not read from the prefix cache
        engine.pp_depth = depth
        outputs = engine.generate_batch(many, params)
        assert overlaps(timeline) >= 3  # rank 0 runs micro-batch k+1 while rank 1 runs k
    assert depth == 2 and all(o.completion_tokens == 6 for o in outputs)


def test_a_storm_with_aborts_and_a_small_pool_leaks_nothing(checkpoints):
    rng, model = random.Random(3), str(checkpoints["dense"])
    with Engine(model_path=model, device="cpu", page_size=4, kv_cache_bytes=1 << 20) as probe:  # rank 0's layer
        page_bytes = probe.runner.pool.bytes_per_page(probe.config, 4, torch.float32) // probe.config.num_hidden_layers
    # 24 pages of 4 tokens; a request needs up to 23: a few at a time fit, so some are retracted.
    with Engine(model_path=model, device="cpu", pp_size=2, page_size=4, chunked_prefill_size=16,
                kv_cache_bytes=24 * page_bytes) as engine:
        ids = [engine.add_request([rng.randrange(3, 1000) for _ in range(rng.randint(2, 50))],
                                  max_tokens=rng.randint(1, 40), temperature=0.8, seed=i) for i in range(24)]
        aborted, outputs, steps = set(rng.sample(ids, 6)), {}, 0
        while len(outputs) < len(ids):
            engine.step()
            steps += 1
            assert steps < 2000, "the storm never ended"
            for rid in ids:
                if rid in aborted and steps == 3 + rid % 7 and rid not in outputs:
                    engine.abort_request(rid)
                if rid not in outputs and (out := engine.get_output(rid)) is not None:
                    outputs[rid] = out
        assert all(o.finish_reason in ("length", "abort") for o in outputs.values())
        assert engine.scheduler.num_retractions > 0, "the pool was small enough to retract"
        runner = engine.runner
        assert runner.allocator.num_free + runner.radix_cache.total_pages == runner.allocator.num_pages
        assert not engine.micro_batches


def test_a_killed_pipeline_rank_fails_the_next_step_at_once(checkpoints):
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", pp_size=2, dist_timeout=60) as engine:
        engine.generate([5, 6, 7], GREEDY)
        worker = engine.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        with pytest.raises(WorkerFailure, match=r"rank 1 died mid-serve"):  # noticed, not timed out (60 s)
            engine.generate([5, 6, 7], GREEDY)


@pytest.mark.parametrize(("fault", "timeout", "match"), [
    ("hang", 3, r"did not answer within dist_timeout=3 s"),
    # A raised error comes back at once and is quoted (the 60 s timeout is not what ends it).
    ("raise", 60, r"(?s)rank 1 raised during a step.*told to fail at step 3"),
])
def test_a_hung_or_raising_pipeline_rank_fails_the_step(fault, timeout, match, checkpoints, monkeypatch):
    monkeypatch.setattr("stage19_pipeline_parallel.engine.WorkerGroup",
                        faulty_worker_group("stage19_pipeline_parallel", 1, fault, 3))
    with Engine(model_path=str(checkpoints["dense"]), device="cpu", pp_size=2, dist_timeout=timeout) as engine, \
            pytest.raises(WorkerFailure, match=match):
        engine.generate([5, 6, 7], GREEDY)


@pytest.mark.parametrize(("settings", "match"), [
    (dict(pp_size=2, speculative_algorithm="NGRAM"), "does not compose with speculative_algorithm"),
    (dict(pp_size=2, enable_hierarchical_cache=True), "does not compose with enable_hierarchical_cache"),
    (dict(pp_size=2, pp_layer_partition=[2]), "must give each of the 2 pipeline ranks"),
    (dict(pp_layer_partition=[1, 1]), "needs pp_size above 1"),
    (dict(pp_max_micro_batch_size=4), "needs pp_size above 1"),
])
def test_what_the_pipeline_does_not_cover_is_refused(settings, match, checkpoints):
    with pytest.raises(ValueError, match=match):
        Engine(model_path=str(checkpoints["dense"]), device="cpu", **settings)
