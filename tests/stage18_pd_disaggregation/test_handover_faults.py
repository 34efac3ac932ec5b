"""Stage 18's handovers under faults, engines in process (the router's part: test_pd_router_faults.py).

Several prefill and decode engines serve a storm with aborts on both sides:
every request ends (with its tokens, or aborted, or with the decode side's
timeout error when its prefill half was aborted), and no page is leaked on any
engine. A prefill engine that goes away or hangs mid-transfer, and a decode
engine that goes away after asking for its K/V, end their requests within the
timeout; the engines that remain serve on.
"""

import random
import time

import pytest
import torch
from test_handover import ROOMS, check_books, free_port

from stage17_hicache import Engine as Stage17
from stage18_pd_disaggregation import Engine, SamplingParams


def step_until(engines, done, deadline_s=30.0):
    start = time.monotonic()
    while not done():
        assert time.monotonic() - start < deadline_s, "the engines never got there"
        for engine in engines:
            engine.step()


def boot(port):
    return dict(bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=next(ROOMS))


def drained(engine):
    """The handovers a prefill engine still holds K/V for."""
    return engine.stats()["prefill_inflight"] == 0


def test_a_storm_over_two_prefill_and_two_decode_engines_accounts_for_every_request(checkpoints):
    model = str(checkpoints["dense"])
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(2, 60))] for _ in range(24)]
    for i in range(0, 24, 4):  # shared prefixes: the prefill engines' prefix caches take part
        prompts[i + 1] = prompts[i][:20] + prompts[i + 1]
    params = [SamplingParams(max_tokens=rng.randint(1, 16), temperature=0, ignore_eos=True) for _ in prompts]
    with Stage17(model_path=model, device="cpu") as alone:
        expected = [alone.generate(p, s).token_ids for p, s in zip(prompts, params)]
    ports = [free_port(), free_port()]
    prefills = [Engine(model_path=model, device="cpu", disaggregation_mode="prefill", disaggregation_bootstrap_port=port,
                       disaggregation_timeout=2.0) for port in ports]
    # One decode pool of 8 pages: its handovers wait for pages (the waiting state) while others decode.
    page_bytes = prefills[0].runner.pool.bytes_per_page(prefills[0].config, 16, torch.float32)
    decodes = [Engine(model_path=model, device="cpu", disaggregation_mode="decode", disaggregation_timeout=2.0,
                      kv_cache_bytes=kv_bytes) for kv_bytes in (None, 8 * page_bytes)]
    engines = prefills + decodes
    try:
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            room = boot(ports[i % 2])
            ids.append((prefills[i % 2], prefills[i % 2].add_request(prompt, p, **room),
                        decodes[i % 3 % 2], decodes[i % 3 % 2].add_request(prompt, p, **room)))
        abort_decode, abort_prefill = set(rng.sample(range(24), 5)), set(rng.sample(range(24), 4))
        outputs, prefilled, steps = {}, set(), 0

        def finished():
            nonlocal steps
            steps += 1
            for i, (prefill, p_id, decode, d_id) in enumerate(ids):
                if steps == 2 + i % 5 and i in abort_decode and i not in outputs:
                    decode.abort_request(d_id)
                if steps == 1 + i % 3 and i in abort_prefill and i not in prefilled:
                    prefill.abort_request(p_id)
                if i not in outputs and (out := decode.get_output(d_id)) is not None:
                    outputs[i] = out
                if i not in prefilled and prefill.get_output(p_id) is not None:
                    prefilled.add(i)
            return len(outputs) == len(ids) and len(prefilled) == len(ids)

        step_until(engines, finished)
        for i, out in outputs.items():
            if out.finish_reason == "length":
                assert out.token_ids == expected[i]
            else:  # aborted on the decode side, or its prefill half was (its K/V never came)
                assert out.finish_reason == "abort" and (i in abort_decode or i in abort_prefill), i
                assert i in abort_decode or "no K/V arrived" in out.error
        assert sum(out.finish_reason == "length" for out in outputs.values()) >= 24 - 9
        step_until(engines, lambda: all(drained(p) for p in prefills), deadline_s=10)
        for engine in engines:
            check_books(engine)
        stats = [d.stats() for d in decodes]
        assert sum(s["handovers_done"] for s in stats) >= 24 - 9
        assert all(s["decode_prealloc"] == s["decode_transfer"] == 0 for s in stats)
    finally:
        for engine in engines:
            engine.shutdown()


@pytest.fixture
def pair(checkpoints):
    port = free_port()
    model = str(checkpoints["dense"])
    prefill = Engine(model_path=model, device="cpu", disaggregation_mode="prefill", disaggregation_bootstrap_port=port,
                     disaggregation_timeout=1.0)
    decode = Engine(model_path=model, device="cpu", disaggregation_mode="decode", disaggregation_timeout=1.0)
    yield model, prefill, decode, port
    prefill.shutdown()
    decode.shutdown()


def test_a_prefill_engine_that_goes_away_mid_transfer_fails_its_requests_and_frees_them(pair):
    model, prefill, decode, port = pair
    room = boot(port)
    prefill.add_request([5, 6, 7, 8], max_tokens=4, **room)
    rid = decode.add_request([5, 6, 7, 8], max_tokens=4, **room)
    decode.step()  # pages reserved, the prefill engine asked: transferring
    assert decode.stats()["decode_transfer"] == 1
    prefill.shutdown()  # before it computed the prompt
    outputs = []  # (step_until's deadline bounds the wait; the error says it was the handover timeout)
    step_until([decode], lambda: outputs.append(decode.get_output(rid)) or outputs[-1] is not None)
    assert "no K/V arrived" in outputs[-1].error
    check_books(decode)
    assert decode.stats()["handovers_failed"] == 1 and decode.stats()["decode_transfer"] == 0
    # The decode engine serves on, with another prefill engine.
    port2 = free_port()
    with Engine(model_path=model, device="cpu", disaggregation_mode="prefill", disaggregation_bootstrap_port=port2) as p2:
        room = boot(port2)
        p2.add_request([5, 6, 7], max_tokens=3, temperature=0, ignore_eos=True, **room)
        rid = decode.add_request([5, 6, 7], max_tokens=3, temperature=0, ignore_eos=True, **room)
        step_until([p2, decode], lambda: outputs.append(decode.get_output(rid)) or outputs[-1] is not None)
        assert outputs[-1].finish_reason == "length"
    check_books(decode)


def test_a_hung_prefill_engine_times_out_and_its_late_kv_is_dropped(pair):
    _, prefill, decode, port = pair
    late = boot(port)
    prefill.add_request([9, 8, 7], max_tokens=2, **late)
    rid = decode.add_request([9, 8, 7], max_tokens=2, **late)
    outputs = []
    step_until([decode], lambda: outputs.append(decode.get_output(rid)) or outputs[-1] is not None)
    assert "no K/V arrived" in outputs[-1].error
    check_books(decode)
    room = boot(port)  # the prefill engine wakes up: the late K/V arrives and is dropped; a new request works
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    p_id = prefill.add_request([9, 8, 7, 6], params, **room)
    rid = decode.add_request([9, 8, 7, 6], params, **room)
    step_until([prefill, decode], lambda: outputs.append(decode.get_output(rid)) or outputs[-1] is not None)
    assert outputs[-1].finish_reason == "length", outputs[-1].error
    assert prefill.get_output(p_id) is not None
    step_until([prefill, decode], lambda: drained(prefill))
    check_books(decode)
    check_books(prefill)
    assert decode.stats()["handovers_done"] == 1 and decode.stats()["handovers_failed"] == 1


def test_a_decode_engine_that_goes_away_leaves_nothing_held_on_the_prefill_engine(pair):
    model, prefill, decode, port = pair
    asked, never = boot(port), boot(port)
    ids = [prefill.add_request([4, 5, 6], max_tokens=3, **room) for room in (asked, never)]
    decode.add_request([4, 5, 6], max_tokens=3, **asked)
    decode.step()  # it asks for one handover, then goes away; the other it never asks for
    decode.shutdown()
    finished = set()
    step_until([prefill], lambda: finished.update(i for i in ids if i not in finished and prefill.get_output(i))
               or len(finished) == 2)
    assert prefill.stats()["prefill_inflight"] > 0  # their K/V, held for the decode engine
    step_until([prefill], lambda: drained(prefill), deadline_s=10)  # dropped after the timeout (1 s)
    check_books(prefill)
    # The prefill engine serves on, for a decode engine that comes later.
    with Engine(model_path=model, device="cpu", disaggregation_mode="decode") as d2:
        room = boot(port)
        prefill.add_request([4, 5, 6], max_tokens=3, temperature=0, ignore_eos=True, **room)
        rid = d2.add_request([4, 5, 6], max_tokens=3, temperature=0, ignore_eos=True, **room)
        outputs = []
        step_until([prefill, d2], lambda: outputs.append(d2.get_output(rid)) or outputs[-1] is not None)
        assert outputs[-1].finish_reason == "length"
    check_books(prefill)
