"""A request storm against every batching stage (04 on): nothing lost, nothing leaked.

About a hundred and forty requests arrive a few per step with mixed lengths, shared prefixes
and sampling settings; some are aborted at random moments; the KV pool is so
small that requests are retracted and cached prefixes evicted. Afterwards:

* every request finished or was aborted, and each output was collected once;
* a greedy request produced exactly the tokens it produces alone (stage 03, one
  request at a time); an aborted greedy request produced a prefix of them;
* a sampled request stayed within its budget and the vocabulary;
* with no request left, no radix node is locked, every page-table row is free,
  and after ``flush_cache()`` every page is back in the free list.
"""

import importlib
import random

import pytest
import torch

from checkpoints import write_checkpoint
from common.config import ModelConfig
from common.sampling import SamplingParams
from conftest import STAGES, stage_engine_class, stage_has

STORM_STAGES = [s for s in STAGES if stage_has(s, "max_prefill_tokens")]  # continuous batching on
PAGE = 4
POOL_PAGES = 24  # a request needs up to 17 pages: a few at a time fit, so some are retracted
VOCAB = 1024  # the storm's checkpoint: a small vocabulary keeps each step's sampling cheap
STEPS = 120  # about 140 requests


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def random_params(rng: random.Random) -> SamplingParams:
    """Greedy (plain, with penalties, or with filters that greedy ignores) or sampled."""
    max_tokens = rng.randint(1, 40)
    kind = rng.choice(["greedy", "greedy", "penalties", "filters", "sampled", "seeded"])
    if kind == "greedy":
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    if kind == "penalties":
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, repetition_penalty=1.3,
                              frequency_penalty=0.4, presence_penalty=0.3)
    if kind == "filters":
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, top_k=5, top_p=0.8)
    return SamplingParams(max_tokens=max_tokens, temperature=rng.choice([0.6, 1.0, 1.5]), ignore_eos=rng.random() < 0.5,
                          top_k=rng.choice([-1, 20]), top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.05]),
                          seed=rng.randrange(1000) if kind == "seeded" else None)


def storm_requests(seed: int = 0) -> list[list[tuple[list[int], SamplingParams]]]:
    """The requests that arrive before each step: the same storm for every stage."""
    rng = random.Random(seed)
    prefixes = [random_tokens(rng, rng.randint(4, 16)) for _ in range(5)]
    return [[(rng.choice(prefixes)[: rng.randint(0, 16)] + random_tokens(rng, rng.randint(1, 12)), random_params(rng))
             for _ in range(rng.choice([0, 0, 1, 1, 2, 3]))] for _ in range(STEPS)]


def drive_storm(engine) -> tuple[dict, dict, set]:
    """Send the storm, aborting someone now and then, and step until nothing is left.

    Returns ``(submitted {id: (prompt, params)}, outputs {id: output}, aborted ids)``.
    Bounded: a leak that starves the pool ends the loop (and fails the checks), not the run.
    """
    rng = random.Random(1)  # when to abort, and whom
    scheduler = engine.scheduler
    submitted, outputs, aborted = {}, {}, set()

    def collect():
        for rid in submitted:
            if rid not in outputs and (out := engine.get_output(rid)) is not None:
                outputs[rid] = out

    for arrivals in storm_requests():
        for prompt, params in arrivals:
            submitted[engine.add_request(prompt, params)] = (prompt, params)
        if rng.random() < 0.15:  # abort someone not yet collected: waiting, running or just finished
            candidates = [rid for rid in submitted if rid not in outputs]
            if candidates:
                rid = rng.choice(candidates)
                engine.abort_request(rid)
                aborted.add(rid)
        engine.step()
        collect()
    for _ in range(2000):
        if not (scheduler.waiting or scheduler.running or getattr(engine, "in_flight", None)):
            break
        engine.step()
        collect()
    collect()
    return submitted, outputs, aborted


@pytest.fixture(scope="module")
def storm_checkpoint(tmp_path_factory, builtin_folder):
    return write_checkpoint("dense", tmp_path_factory.mktemp("storm") / "dense", builtin_folder, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def alone(storm_checkpoint):
    """Stage 03 serving one request at a time: the tokens a greedy request must produce."""
    from stage03_radix import Engine as Stage03

    with Stage03(model_path=str(storm_checkpoint), device="cpu", page_size=PAGE) as engine:
        memo = {}

        def tokens(prompt: list[int], params: SamplingParams) -> list[int]:
            key = (tuple(prompt), repr(params))
            if key not in memo:
                memo[key] = engine.generate(prompt, params).token_ids
            return memo[key]

        yield tokens


def small_pool_engine(stage: str, model_path, **settings):
    """The stage's engine with a pool of POOL_PAGES pages and its scheduling options turned on
    (and ``settings``: stage 17's storm adds its hierarchical cache)."""
    engine_class = stage_engine_class(stage)
    kwargs = dict(model_path=str(model_path), device="cpu", page_size=PAGE, max_prefill_tokens=64, **settings)
    if stage_has(stage, "chunked_prefill_size"):
        kwargs["chunked_prefill_size"] = 16  # long prompts run in chunks beside decodes
    if stage_has(stage, "schedule_policy"):
        kwargs["schedule_policy"] = "lpm"  # reorders the queue by cached prefix
    pool_class = importlib.import_module(f"{stage}.kv_cache").PagedKVPool
    page_bytes = pool_class.bytes_per_page(ModelConfig.from_file(model_path), PAGE, torch.float32)
    return engine_class(kv_cache_bytes=POOL_PAGES * page_bytes, **kwargs)


@pytest.mark.parametrize("stage", STORM_STAGES)
def test_a_storm_with_aborts_and_a_small_pool_loses_and_leaks_nothing(stage, storm_checkpoint, alone):
    with small_pool_engine(stage, storm_checkpoint) as engine:
        runner, scheduler = engine.runner, engine.scheduler
        free_rows_at_start = len(runner.page_tables.free_rows)
        submitted, outputs, aborted = drive_storm(engine)

        assert len(submitted) > STEPS and outputs.keys() == submitted.keys(), "a request was lost"
        assert scheduler.num_retractions > 0, "the pool should have been too small for everyone at once"
        assert sum(o.cached_tokens for o in outputs.values()) > 0, "shared prefixes should have hit the cache"
        assert any(outputs[rid].finish_reason == "abort" for rid in aborted)
        for rid, (prompt, params) in submitted.items():
            out = outputs[rid]
            assert len(out.token_ids) <= params.max_tokens
            assert all(0 <= t < engine.config.vocab_size for t in out.token_ids)
            if out.finish_reason == "abort":
                assert rid in aborted
            if params.temperature == 0:
                expected = alone(prompt, params)
                if out.finish_reason == "abort":
                    assert out.token_ids == expected[: len(out.token_ids)], rid
                else:
                    assert out.token_ids == expected, rid

        radix = runner.radix_cache
        assert all(node.lock_ref == 0 for node in radix._nodes() if node is not radix.root), "a prefix is still locked"
        assert radix.locked_pages == 0
        assert len(runner.page_tables.free_rows) == free_rows_at_start, "a page-table row was not returned"
        assert runner.allocator.num_free + radix.total_pages == runner.allocator.num_pages, "a page was leaked"
        engine.flush_cache()
        assert runner.allocator.num_free == runner.allocator.num_pages
