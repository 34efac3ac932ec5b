"""Stage 17: the hierarchical KV cache (device pool -> host memory -> files) under the radix tree.

The oracles: the same engine with the hierarchical cache off, and stage 16, both
of which must give the same greedy tokens; the prefilled-token count (prompt
minus cached tokens), which must drop; and the tiers' own books: every device
and host page is free or held by exactly one node, and a flush empties every
tier, files included.
"""

import random

import pytest
import torch

from checkpoints import write_checkpoint
from common.sampling import SamplingParams
from stage16_data_parallel import Engine as Stage16
from stage17_hicache import Engine
from stage17_hicache.metrics import ServerMetrics
from test_request_storm import STEPS, drive_storm, small_pool_engine
from test_request_storm import VOCAB as STORM_VOCAB

PAGE = 4
VOCAB = 512
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory, builtin_folder):
    return write_checkpoint("dense", tmp_path_factory.mktemp("hicache") / "dense", builtin_folder, vocab_size=VOCAB)


def make(model, pool_pages: int, engine_class=Engine, **settings):
    """An engine on the CPU whose device pool holds ``pool_pages`` pages."""
    probe = engine_class(model_path=str(model), device="cpu", page_size=PAGE, kv_cache_bytes=1 << 20)
    page_bytes = probe.runner.pool.bytes_per_page(probe.config, PAGE, torch.float32)
    probe.shutdown()
    return engine_class(model_path=str(model), device="cpu", page_size=PAGE, kv_cache_bytes=pool_pages * page_bytes,
                        **settings)


def conversations(rounds: int = 3, prefixes: int = 6, seed: int = 0) -> list[list[int]]:
    """Each round visits every shared prefix (32 tokens, 8 pages) with a new tail: far more prefix
    than a 20-page pool keeps, so without a lower tier each visit computes its prefix again."""
    rng = random.Random(seed)
    shared = [[rng.randrange(3, VOCAB) for _ in range(32)] for _ in range(prefixes)]
    return [p + [rng.randrange(3, VOCAB) for _ in range(3)] for _ in range(rounds) for p in shared]


def serve(engine, prompts) -> tuple[list[list[int]], int]:
    """Greedy tokens of each prompt, one after another, and the prompt tokens computed (not cached)."""
    outputs = [engine.generate(p, GREEDY) for p in prompts]
    return [o.token_ids for o in outputs], sum(o.prompt_tokens - o.cached_tokens for o in outputs)


def check_books(engine) -> None:
    """Every device and host page is free or held by exactly one node of the tree."""
    runner, tree = engine.runner, engine.runner.radix_cache
    assert runner.allocator.num_free + tree.total_pages == runner.allocator.num_pages, "a device page was leaked"
    held = [p for n in tree._nodes() if n.host_pages for p in n.host_pages]
    assert len(held) == len(set(held)) == tree.host.num_pages - tree.host.num_free, "a host page was leaked"
    assert tree.locked_pages == 0


def tiers(engine, prompt) -> list[str]:
    """Where the prompt's cached prefix lies, node by node: "device", "host" or "disk"."""
    pages, _, below = engine.runner.radix_cache.match_tiers(prompt)
    return ["device"] * bool(pages) + ["host" if n.host_pages is not None else "disk" for n in below]


@pytest.fixture(scope="module")
def reference(model):
    """Stage 16 with the same small pool: the tokens, and how many prompt tokens it computed."""
    with make(model, 20, Stage16) as engine:
        return serve(engine, conversations())


@pytest.mark.parametrize("policy", ["write_back", "write_through"])
def test_a_pool_too_small_for_the_prefixes_gives_the_same_tokens_and_prefills_fewer(model, reference, policy):
    tokens, computed = reference
    with make(model, 20) as engine:
        assert serve(engine, conversations()) == (tokens, computed), "hicache off is stage 16"
    with make(model, 20, enable_hierarchical_cache=True, hicache_write_policy=policy, hicache_ratio=4) as engine:
        hi_tokens, hi_computed = serve(engine, conversations())
        stats = engine.stats()
        check_books(engine)
    assert hi_tokens == tokens
    assert stats["hicache_host_hit_tokens"] > 0 and stats["hicache_bytes_loaded"] > 0
    # The host tier (80 pages) holds every prefix (6 x 8 pages): rounds 2 and 3 find theirs there,
    # 12 visits x 32 tokens not computed.
    assert hi_computed <= computed - 12 * 32, (hi_computed, computed)


def test_a_prefix_goes_to_host_then_to_disk_and_comes_back_the_same(model, tmp_path, reference):
    prompts = conversations()
    first = prompts[0]
    with make(model, 20, enable_hierarchical_cache=True, hicache_write_policy="write_back", hicache_ratio=0.6,
               hicache_storage_backend="file", hicache_storage_dir=str(tmp_path)) as engine:
        out = [engine.generate(first, GREEDY).token_ids]
        assert tiers(engine, first) == ["device"]
        engine.generate(prompts[1], GREEDY)
        engine.generate(prompts[2], GREEDY)  # the pool is full: the first prefix goes to the host
        assert tiers(engine, first)[:1] == ["host"]
        for p in prompts[3:6]:  # ... and the host tier too: it goes to a file
            engine.generate(p, GREEDY)
        assert "disk" in tiers(engine, first)
        assert engine.runner.radix_cache.host.num_pages < 2 * 9, "the host tier holds one prompt's pages, not two"
        again = engine.generate(first, GREEDY)
        stats = engine.stats()
        check_books(engine)
        assert again.token_ids == out[0] == reference[0][0]
        assert stats["hicache_disk_hit_tokens"] > 0 and stats["hicache_bytes_stored"] > 0
        assert again.cached_tokens >= 16
        engine.flush_cache()
        assert not list(tmp_path.glob("*.kv")), "flush leaves no file behind"


@pytest.mark.parametrize("damage", ["altered", "truncated", "deleted"])
def test_a_damaged_file_is_counted_and_its_prefix_computed_again(model, tmp_path, reference, damage):
    prompts = conversations()
    with make(model, 20, enable_hierarchical_cache=True, hicache_write_policy="write_back", hicache_ratio=0.6,
               hicache_storage_backend="file", hicache_storage_dir=str(tmp_path)) as engine:
        for p in prompts[:6]:
            engine.generate(p, GREEDY)
        files = sorted(tmp_path.glob("*.kv"))
        assert files
        for path in files:  # damage every file, so the load must fail whichever it reads first
            data = path.read_bytes()
            if damage == "altered":
                path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
            elif damage == "truncated":
                path.write_bytes(data[: len(data) // 2])
            else:
                path.unlink()
        first = engine.generate(prompts[0], GREEDY)  # its prefix was in a file: it is computed again
        assert engine.stats()["hicache_bad_files"] > 0 and engine.stats()["hicache_disk_hit_tokens"] == 0
        assert first.cached_tokens == 0
        again = [first.token_ids] + [engine.generate(p, GREEDY).token_ids for p in prompts[1:6]]
        check_books(engine)
    assert again == reference[0][:6]


def test_write_policies_copy_at_insert_on_eviction_or_after_two_hits(model):
    prompt = conversations()[0]

    def host_used(engine):
        return engine.stats()["hicache_host_pages_used"]

    with make(model, 40, enable_hierarchical_cache=True, hicache_write_policy="write_through") as engine:
        engine.generate(prompt, GREEDY)
        assert host_used(engine) > 0, "write_through copies a prefix when it is cached"
    with make(model, 40, enable_hierarchical_cache=True, hicache_write_policy="write_back") as engine:
        engine.generate(prompt, GREEDY)
        assert host_used(engine) == 0, "write_back copies nothing until eviction"
        engine.runner.radix_cache.evict(engine.runner.radix_cache.total_pages)
        assert host_used(engine) > 0 and tiers(engine, prompt) == ["host"]
    with make(model, 40, enable_hierarchical_cache=True, hicache_write_policy="write_through_selective") as engine:
        engine.generate(prompt, GREEDY)
        engine.generate(prompt, GREEDY)  # the first hit
        assert host_used(engine) == 0
        engine.generate(prompt, GREEDY)  # the second hit: now worth keeping
        assert host_used(engine) > 0
        engine.runner.radix_cache.evict(engine.runner.radix_cache.total_pages)
        assert tiers(engine, prompt) == ["host"]


def test_aborting_a_request_whose_prefix_is_loading_frees_every_tier(model):
    prompt = conversations()[0]
    with make(model, 20, enable_hierarchical_cache=True) as engine:
        expected = engine.generate(prompt, GREEDY).token_ids
        engine.runner.radix_cache.evict(engine.runner.radix_cache.total_pages)
        assert tiers(engine, prompt) == ["host"]
        rid = engine.add_request(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        engine.step()  # admitted: its prefix is loaded back and its forward queued
        assert engine.stats()["hicache_host_hit_tokens"] > 0
        engine.abort_request(rid)
        while (out := engine.get_output(rid)) is None:
            engine.step()
        assert out.finish_reason == "abort"
        check_books(engine)
        assert engine.generate(prompt, GREEDY).token_ids == expected
        engine.flush_cache()
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages
        assert engine.stats()["hicache_host_pages_used"] == 0


def test_a_storm_with_aborts_leaks_nothing_on_any_tier(tmp_path, builtin_folder):
    model = write_checkpoint("dense", tmp_path / "storm", builtin_folder, vocab_size=STORM_VOCAB)
    with small_pool_engine("stage17_hicache", model, enable_hierarchical_cache=True, hicache_ratio=0.5,
                           hicache_write_policy="write_back", hicache_storage_backend="file",
                           hicache_storage_dir=str(tmp_path / "files")) as engine:
        submitted, outputs, _ = drive_storm(engine)
        assert len(submitted) > STEPS and outputs.keys() == submitted.keys(), "a request was lost"
        stats = engine.stats()
        assert stats["hicache_host_hit_tokens"] + stats["hicache_disk_hit_tokens"] > 0
        check_books(engine)
        engine.flush_cache()
        assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages
        assert engine.stats()["hicache_host_pages_used"] == 0
        assert not list((tmp_path / "files").glob("*.kv"))


@pytest.mark.parametrize("settings, words", [
    (dict(hicache_storage_backend="file"), "add enable_hierarchical_cache"),
    (dict(enable_hierarchical_cache=True, disable_radix_cache=True), "drop disable_radix_cache"),
    (dict(enable_hierarchical_cache=True, tp_size=2), "does not compose with tp_size"),
    (dict(enable_hierarchical_cache=True, hicache_write_policy="write_sometimes"), "hicache_write_policy"),
    (dict(enable_hierarchical_cache=True, hicache_ratio=0), "hicache_ratio"),
])
def test_settings_the_hierarchical_cache_cannot_use_are_refused(settings, words):
    with pytest.raises(ValueError, match=words):
        Engine(device="cpu", **settings)


def test_metrics_report_each_tier():
    metrics = ServerMetrics()
    stats = dict(running=0, waiting=0, pages_total=8, pages_used=0, pages_cached=0, generated_tokens=0, spec_verify_ct=0,
                 spec_tokens=0, hicache_device_hit_tokens=5, hicache_host_hit_tokens=7, hicache_disk_hit_tokens=3,
                 hicache_bytes_loaded=100, hicache_bytes_written=200, hicache_bytes_stored=50, hicache_load_seconds=0.5,
                 hicache_bad_files=1, hicache_host_pages_total=16, hicache_host_pages_used=4)
    metrics.observe_stats(stats)
    text = metrics.render().decode()
    for line in ['ladder:hicache_hit_tokens{tier="host"} 7.0', 'ladder:hicache_bytes{direction="stored"} 50.0',
                 'ladder:hicache_host_pages{use="used"} 4.0', "ladder:hicache_bad_files 1.0"]:
        assert line in text
