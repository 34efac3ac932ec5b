"""Stage 06: each policy orders the queue as it promises, and none changes a request's tokens."""

import random

import pytest
import torch

import stage06_scheduling.scheduler as scheduler_module
from common.sampling import SamplingParams
from stage06_scheduling import Engine
from stage06_scheduling.schedule_policy import CACHE_AWARE_QUEUE_LIMIT, POLICIES, SchedulePolicy

PAGE = 4


def tokens(n, seed):
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


GROUPS = [tokens(48, 700 + g) for g in range(3)]


def prefix_heavy(seed=0, count=12):
    """Requests in groups that share 48-token prefixes, shuffled."""
    rng = random.Random(seed)
    prompts = [GROUPS[i % 3] + tokens(rng.randint(2, 9), 800 + i) for i in range(count)]
    rng.shuffle(prompts)
    return prompts


@pytest.fixture(scope="module")
def stage05_tokens(checkpoints):
    from stage05_chunked import Engine as Stage05

    with Stage05(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE) as engine:
        yield lambda prompts, n: [o.token_ids for o in engine.generate_batch(prompts, greedy(n))]


def make_engine(checkpoints, policy="fcfs", **kwargs):
    return Engine(model_path=str(checkpoints["dense"]), device="cpu", page_size=PAGE, schedule_policy=policy, **kwargs)


def count_prompt_tokens(engine):
    """Prompt tokens actually computed by forwards (cache hits are not)."""
    computed, original = [0], engine.runner.step

    def counted(requests, new_lengths):
        for r, n in zip(requests, new_lengths):
            computed[0] += max(0, min(r.num_cached + n, len(r.prompt_ids)) - r.num_cached)
        return original(requests, new_lengths)

    engine.runner.step = counted
    return computed


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_gives_stage05_tokens(policy, checkpoints, stage05_tokens):
    prompts = prefix_heavy()
    with make_engine(checkpoints, policy) as engine:
        outputs = engine.generate_batch(prompts, greedy(6))
        assert [o.token_ids for o in outputs] == stage05_tokens(prompts, 6)
        assert not engine.scheduler.running and engine.runner.radix_cache.locked_pages == 0
        engine.flush_cache()
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages


# ----- hand-built queues -----------------------------------------------------------------


@pytest.fixture()
def engine(checkpoints):
    with make_engine(checkpoints) as engine:
        yield engine


def queue(engine, prompts, max_tokens=None):
    max_tokens = max_tokens or [4] * len(prompts)
    return [engine._make_requests([p], greedy(m), {})[0] for p, m in zip(prompts, max_tokens)]


def cache_prompt(engine, prompt):
    engine.generate(prompt, greedy(1))


def test_fcfs_keeps_arrival_order(engine):
    reqs = queue(engine, [tokens(5, i) for i in range(4)])
    assert SchedulePolicy("fcfs", engine.runner.radix_cache).order(reqs) == reqs


def test_lof_puts_the_longest_output_first_and_keeps_ties_in_order(engine):
    reqs = queue(engine, [tokens(5, i) for i in range(4)], max_tokens=[3, 9, 3, 5])
    assert SchedulePolicy("lof", engine.runner.radix_cache).order(reqs) == [reqs[1], reqs[3], reqs[0], reqs[2]]


def test_random_is_a_seeded_permutation(engine):
    reqs = queue(engine, [tokens(5, i) for i in range(8)])
    a = SchedulePolicy("random", engine.runner.radix_cache, seed=1).order(reqs)
    b = SchedulePolicy("random", engine.runner.radix_cache, seed=1).order(reqs)
    assert a == b and sorted(r.id for r in a) == sorted(r.id for r in reqs) and a != reqs


def test_lpm_puts_the_longest_cached_prefix_first(engine):
    long_hit, short_hit = GROUPS[0], GROUPS[1][:12]
    cache_prompt(engine, long_hit + [5])
    cache_prompt(engine, short_hit + [5])
    reqs = queue(engine, [tokens(20, 1), short_hit + tokens(9, 2), long_hit + tokens(3, 3)])
    assert SchedulePolicy("lpm", engine.runner.radix_cache).order(reqs) == [reqs[2], reqs[1], reqs[0]]


def test_dfs_weight_runs_requests_of_the_heaviest_subtree_together(engine):
    a, b = GROUPS[0], GROUPS[1]
    cache_prompt(engine, a + [5])
    cache_prompt(engine, b + [5])
    prompts = [a + [7, 1], b + [7, 2], b + [7, 3], a + [7, 4], b + [7, 5], tokens(9, 6)]
    reqs = queue(engine, prompts)
    order = SchedulePolicy("dfs-weight", engine.runner.radix_cache).order(reqs)
    # Subtree b has 3 waiting requests, a has 2, the unmatched one sits at the root (visited first).
    assert order == [reqs[5], reqs[1], reqs[2], reqs[4], reqs[0], reqs[3]]


def test_cache_aware_policies_fall_back_to_fcfs_on_a_long_queue(engine):
    cache_prompt(engine, GROUPS[0] + [5])
    reqs = queue(engine, [tokens(3, i) for i in range(CACHE_AWARE_QUEUE_LIMIT)] + [GROUPS[0] + [9, 9]])
    policy = SchedulePolicy("lpm", engine.runner.radix_cache)
    assert policy.order(reqs) == reqs
    assert policy.order(reqs[-20:])[0] is reqs[-1]


def test_unknown_policy_and_cache_aware_without_cache_are_refused(checkpoints):
    with pytest.raises(ValueError, match="schedule_policy='sjf'"):
        make_engine(checkpoints, "sjf")
    with pytest.raises(ValueError, match="needs the radix cache"):
        make_engine(checkpoints, "lpm", disable_radix_cache=True)


# ----- in-batch sharing and starvation ---------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_in_batch_sharing_computes_a_shared_uncached_prefix_once(policy, checkpoints, stage05_tokens, monkeypatch):
    shared = tokens(64, 900)
    suffixes = [tokens(5, 901 + i) for i in range(4)]
    prompts = [shared + s for s in suffixes]
    results = {}
    for sharing in (True, False):
        if not sharing:
            monkeypatch.setattr(scheduler_module, "IN_BATCH_PREFIX_TOKENS", 10**9)
        with make_engine(checkpoints, policy, chunked_prefill_size=-1) as engine:
            computed = count_prompt_tokens(engine)
            outputs = engine.generate_batch(prompts, greedy(4))
            assert [o.token_ids for o in outputs] == stage05_tokens(prompts, 4)
            results[sharing] = computed[0]
    assert results[True] <= 64 + 4 * (5 + PAGE)  # the prefix once, then suffixes (page remainders redone)
    assert results[False] == 4 * 69


def test_no_request_starves_behind_a_stream_of_favoured_ones(checkpoints, monkeypatch):
    """lof favours long outputs; a short request must still run within the starvation bound."""
    monkeypatch.setattr(scheduler_module, "STARVATION_STEPS", 6)
    with make_engine(checkpoints, "lof", max_prefill_tokens=8, chunked_prefill_size=-1) as engine:
        short = engine.add_request(tokens(8, 1), greedy(1))
        waited = 0
        while engine.get_output(short) is None:
            for i in range(2):  # favoured requests keep arriving
                engine.add_request(tokens(8, 100 + waited * 2 + i), greedy(50))
            engine.step()
            waited += 1
            assert waited <= 6 + 2, "the short request starved"
        for rid in list(engine._by_id):
            engine.abort_request(rid)
