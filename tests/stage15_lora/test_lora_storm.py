"""Stage 15 under the ladder's request storm, with adapters: nothing lost, nothing leaked.

The storm of ``tests/ladder/test_request_storm.py`` (some 140 requests, aborts, a pool so
small that requests are retracted), each request with one of three adapters or none, and only
two adapter slots: admission must keep the running set within two adapters, and the pool swaps
adapters in and out. Every greedy request gives the tokens it gives alone under its adapter.
"""

import itertools

import torch
from test_lora import write_adapter

from stage15_lora import Engine
from test_request_storm import PAGE, POOL_PAGES, STEPS, drive_storm, storm_checkpoint  # noqa: F401

NAMES = ["x", "y", None, "z"]


def test_a_storm_with_adapters_loses_and_leaks_nothing(storm_checkpoint, tmp_path):  # noqa: F811
    adapters = {name: write_adapter(storm_checkpoint, tmp_path / name, ["q_proj", "v_proj", "down_proj"], 8, 16, False, i)
                for i, name in enumerate(n for n in NAMES if n)}
    kwargs = dict(model_path=str(storm_checkpoint), device="cpu", page_size=PAGE, lora_paths=adapters)
    with Engine(**kwargs) as reference:
        memo = {}

        def alone(prompt, params, name):
            key = (tuple(prompt), repr(params), name)
            if key not in memo:
                memo[key] = reference.generate(prompt, params, lora_path=name).token_ids
            return memo[key]

        page_bytes = reference.runner.pool.bytes_per_page(reference.config, PAGE, torch.float32)
        with Engine(kv_cache_bytes=POOL_PAGES * page_bytes, max_prefill_tokens=64, chunked_prefill_size=16,
                    schedule_policy="lpm", max_loras_per_batch=2, **kwargs) as engine:
            runner, names, adapter_of = engine.runner, itertools.cycle(NAMES), {}
            add, launch, widest = engine.add_request, runner.launch, []

            def add_with_adapter(prompt, params):
                name = next(names)
                rid = add(prompt, params, lora_path=name)
                adapter_of[rid] = name
                return rid

            def counting_launch(requests, new_lengths):
                widest.append(len({r.lora_path for r in requests} - {None}))
                return launch(requests, new_lengths)

            engine.add_request, runner.launch = add_with_adapter, counting_launch
            submitted, outputs, _ = drive_storm(engine)
            assert len(submitted) > STEPS and outputs.keys() == submitted.keys(), "a request was lost"
            assert engine.scheduler.num_retractions > 0 and max(widest) == 2
            for rid, (prompt, params) in submitted.items():
                out = outputs[rid]
                if params.temperature == 0:
                    expected = alone(prompt, params, adapter_of[rid])
                    assert out.token_ids == (expected[: len(out.token_ids)] if out.finish_reason == "abort" else expected), rid
            radix = runner.radix_cache
            assert radix.locked_pages == 0 and len(radix.roots) == 4  # the base and three adapters
            assert runner.allocator.num_free + radix.total_pages == runner.allocator.num_pages, "a page was leaked"
            engine.flush_cache()
            assert runner.allocator.num_free == runner.allocator.num_pages
