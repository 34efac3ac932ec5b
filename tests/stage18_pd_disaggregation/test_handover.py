"""Stage 18: a prefill engine hands each prompt's K/V and first token to a decode engine.

The oracle is stage 17 serving the same requests alone (greedy tokens, and a
grammar's output); the books are each engine's pages: after everything ends,
every page is free or cached on both sides. Faults: no K/V arrives (no prefill
engine, or one that went away) within the timeout: the request ends with an
error and frees what it held.
"""

import itertools
import random
import socket
import time

import pytest

from stage17_hicache import Engine as Stage17
from stage18_pd_disaggregation import Engine, SamplingParams

ROOMS = itertools.count(1)


def free_port() -> int:
    """A port nothing listens on now, for a prefill engine's bootstrap store."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model(checkpoints):
    return str(checkpoints["dense"])


@pytest.fixture(scope="module")
def pair(model):
    """A prefill engine (its bootstrap port) and a decode engine that takes its requests' K/V, built once."""
    port = free_port()
    prefill = Engine(model_path=model, device="cpu", disaggregation_mode="prefill", disaggregation_bootstrap_port=port)
    decode = Engine(model_path=model, device="cpu", disaggregation_mode="decode", disaggregation_timeout=20.0)
    yield prefill, decode, port
    prefill.shutdown()
    decode.shutdown()


def serve(prefill, decode, port, prompts, params, deadline_s=60.0, abort=()):
    """Send each request to both engines (as the router does) and step both until the decode side
    has every output."""
    ids = []
    for prompt, p in zip(prompts, params):
        boot = dict(bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=next(ROOMS))
        ids.append((prefill.add_request(prompt, p, **boot), decode.add_request(prompt, p, **boot)))
    outputs, prefilled, start = {}, {}, time.monotonic()
    while len(outputs) < len(ids) and time.monotonic() - start < deadline_s:
        prefill.step()
        decode.step()
        for i, (p_id, d_id) in enumerate(ids):
            if i in abort and i not in outputs:
                decode.abort_request(d_id)
            if i not in outputs and (out := decode.get_output(d_id)) is not None:
                outputs[i] = out
            if i not in prefilled and (out := prefill.get_output(p_id)) is not None:
                prefilled[i] = out
    while len(prefilled) < len(ids) and time.monotonic() - start < deadline_s:
        prefill.step()
        prefilled.update({i: o for i, (p_id, _) in enumerate(ids) if i not in prefilled
                          and (o := prefill.get_output(p_id)) is not None})
    return [outputs.get(i) for i in range(len(ids))]


def check_books(engine) -> None:
    runner = engine.runner
    cached = runner.radix_cache.total_pages if runner.radix_cache is not None else 0
    assert runner.allocator.num_free + cached == runner.allocator.num_pages, "a page was leaked"
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_the_decode_engine_gives_stage17s_tokens(model, pair):
    prefill, decode, port = pair
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    params = [SamplingParams(max_tokens=rng.randint(1, 12), temperature=0, ignore_eos=True) for _ in prompts]
    with Stage17(model_path=model, device="cpu") as alone:
        expected = [alone.generate(p, s).token_ids for p, s in zip(prompts, params)]
    outputs = serve(prefill, decode, port, prompts, params)
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" and o.error is None for o in outputs)
    check_books(decode)
    check_books(prefill)


def test_a_grammar_is_followed_across_the_handover(model, pair):
    prefill, decode, port = pair
    params = SamplingParams(max_tokens=20, temperature=0, regex=r"(yes|no)[.!]")
    with Stage17(model_path=model, device="cpu") as alone:
        expected = alone.generate([5, 6, 7], params).token_ids
    (output,) = serve(prefill, decode, port, [[5, 6, 7]], [params])
    assert output.token_ids == expected


def test_aborts_on_the_decode_side_leak_nothing(model, pair):
    prefill, decode, port = pair
    prompts = [[3 + i, 4, 5, 6] * 5 for i in range(8)]
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)] * len(prompts)
    outputs = serve(prefill, decode, port, prompts, params, abort={1, 4, 6})
    assert [o.finish_reason for o in outputs].count("abort") == 3
    time.sleep(0.2)
    decode.step()  # K/V of an aborted request may arrive after its abort: it is dropped
    check_books(decode)
    check_books(prefill)


def test_no_kv_within_the_timeout_ends_the_request_with_an_error(model):
    """A prefill engine that listens but never hands this request over (it never got it)."""
    port = free_port()
    with Engine(model_path=model, device="cpu", disaggregation_mode="prefill", disaggregation_bootstrap_port=port), \
            Engine(model_path=model, device="cpu", disaggregation_mode="decode", disaggregation_timeout=0.5) as decode:
        rid = decode.add_request([5, 6, 7], max_tokens=4, bootstrap_host="127.0.0.1", bootstrap_port=port,
                                 bootstrap_room=next(ROOMS))
        start = time.monotonic()
        while (out := decode.get_output(rid)) is None and time.monotonic() - start < 10:
            decode.step()
        assert out is not None and out.finish_reason == "abort" and "no K/V arrived" in out.error
        check_books(decode)


def test_a_request_to_hand_over_names_its_prefill_engine(model, pair):
    prefill, decode, _ = pair
    with pytest.raises(ValueError, match="needs bootstrap_host and bootstrap_port"):
        decode.add_request([5, 6], max_tokens=2, bootstrap_room=7)
    assert prefill.generate([5, 6], max_tokens=3, temperature=0).completion_tokens == 3  # no room: served whole


def test_settings_the_handover_does_not_cover_are_refused():
    with pytest.raises(ValueError, match="does not compose with tp_size"):
        Engine(device="cpu", disaggregation_mode="decode", tp_size=2)
