"""The public Engine API behaves the same in every stage (see DESIGN.md)."""

import json
import shutil

import pytest

from common.sampling import SamplingParams
from conftest import STAGES, stage_engine_class


@pytest.fixture(params=STAGES)
def engine(request, engine_for):
    return engine_for(request.param, "dense")


def test_text_prompt_gives_text_and_counts(engine):
    out = engine.generate("Once upon a time", max_tokens=5, temperature=0, ignore_eos=True)
    assert out.prompt_tokens == len(engine.tokenizer.encode("Once upon a time"))
    assert out.completion_tokens == len(out.token_ids) == 5
    assert out.text == engine.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length"


def test_text_and_its_token_ids_give_the_same_output(engine):
    ids = engine.tokenizer.encode("The same prompt")
    a = engine.generate("The same prompt", max_tokens=6, temperature=0)
    b = engine.generate(ids, max_tokens=6, temperature=0)
    assert a.token_ids == b.token_ids


def test_sampling_params_object_equals_keywords(engine):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3)
    a = engine.generate("abc", params)
    b = engine.generate("abc", max_tokens=6, temperature=0.8, seed=3)
    assert a.token_ids == b.token_ids


def test_a_list_of_texts_gives_a_list_of_outputs(engine):
    outs = engine.generate(["a", "b c"], max_tokens=3, temperature=0)
    assert len(outs) == 2 and all(o.completion_tokens <= 3 for o in outs)


def test_one_params_per_prompt(engine):
    outs = engine.generate_batch(["x", "y"], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=4, ignore_eos=True)])
    assert [o.completion_tokens for o in outs][1] == 4 and outs[0].completion_tokens <= 2


def test_stream_pieces_join_to_the_full_text(engine):
    """Random weights emit arbitrary byte tokens: the stream must still never split a character."""
    kwargs = dict(max_tokens=40, temperature=1.0, seed=1, ignore_eos=True)
    for prompt in ["Hello", "日本語と中文", "🚀 emoji"]:
        pieces = list(engine.generate_stream(prompt, **kwargs))
        assert "".join(pieces) == engine.generate(prompt, **kwargs).text


def test_stop_token_id_ends_the_request(engine):
    free = engine.generate("stop here", max_tokens=10, temperature=0, ignore_eos=True)
    stop_at = free.token_ids[3]
    out = engine.generate("stop here", max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.matched_stop == stop_at  # SGLang's "matched": the token
    assert free.finish_reason == "length" and free.matched_stop is None


def test_stop_string_cuts_the_text_in_stream_and_batch(engine):
    kwargs = dict(max_tokens=30, temperature=0, ignore_eos=True)
    free = engine.generate("a stop string", **kwargs).text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop, "the free text is too short to cut"
    out = engine.generate("a stop string", stop=[stop], **kwargs)
    assert out.finish_reason == "stop" and out.text == free[: free.index(stop)] and out.matched_stop == stop
    never = "\x00never"  # of two stop strings, the one that appeared is the one reported
    assert engine.generate("a stop string", stop=[never, stop], **kwargs).matched_stop == stop
    assert "".join(engine.generate_stream("a stop string", stop=[stop], **kwargs)) == out.text


@pytest.mark.parametrize("stage", STAGES)
def test_eos_from_the_config_ends_the_request_unless_ignored(stage, checkpoints, engine_for, tmp_path):
    """Declare the 4th greedy token an EOS id in config.json: generation stops right there."""
    free = engine_for(stage, "dense").generate([5, 6, 7], max_tokens=10, temperature=0, ignore_eos=True)
    folder = shutil.copytree(checkpoints["dense"], tmp_path / "eos")
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [2, free.token_ids[3]]
    (folder / "config.json").write_text(json.dumps(config))
    with stage_engine_class(stage)(model_path=str(folder), device="cpu") as engine:
        stopped = engine.generate([5, 6, 7], max_tokens=10, temperature=0)
        ignored = engine.generate([5, 6, 7], max_tokens=10, temperature=0, ignore_eos=True)
    cut = free.token_ids.index(free.token_ids[3]) + 1
    assert stopped.token_ids == free.token_ids[:cut] and stopped.finish_reason == "stop"
    assert stopped.matched_stop == free.token_ids[3]  # an EOS id is a stop token too
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_max_tokens_zero_returns_nothing(engine):
    out = engine.generate("anything", max_tokens=0)
    assert out.token_ids == [] and out.finish_reason == "length"


def test_context_length_caps_generation(stage_engine_factory):
    engine = stage_engine_factory(context_length=12)
    out = engine.generate([4] * 10, max_tokens=50, temperature=0, ignore_eos=True)
    assert out.completion_tokens == 2 and out.finish_reason == "length"


@pytest.fixture(params=STAGES)
def stage_engine_factory(request, engine_for):
    return lambda **kwargs: engine_for(request.param, "dense", **kwargs)
