"""Bad input is refused with a ValueError that names it, and the engine keeps serving."""

import pytest

from conftest import STAGES, stage_engine_class

BAD_REQUESTS = [
    (dict(prompt=""), "empty"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1] * 600), "prompt has 600 tokens but the model's context is 512"),
    (dict(prompt=[10**9]), "outside the vocabulary"),
    (dict(prompt=3.5), "must be a string or a list of token ids"),
    (dict(prompt="ok", max_tokens=-1), "max_tokens"),
    (dict(prompt="ok", temperature=-1.0), "temperature"),
    (dict(prompt="ok", top_p=0.0), "top_p"),
    (dict(prompt="ok", top_p=1.01), "top_p"),
    (dict(prompt="ok", top_k=-5), "top_k"),
    (dict(prompt="ok", no_such_param=1), "unknown sampling parameter"),
]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("bad, message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_request_is_refused_and_the_next_one_is_served(stage, bad, message, engine_for):
    engine = engine_for(stage, "dense")
    before = engine.generate("still fine", max_tokens=4, temperature=0, ignore_eos=True)
    bad = dict(bad)
    with pytest.raises(ValueError, match=message):
        engine.generate(bad.pop("prompt"), **bad)
    after = engine.generate("still fine", max_tokens=4, temperature=0, ignore_eos=True)
    assert after.token_ids == before.token_ids


@pytest.mark.parametrize("stage", STAGES)
def test_a_bad_prompt_in_a_batch_rejects_the_whole_batch_before_work(stage, engine_for):
    engine = engine_for(stage, "dense")
    with pytest.raises(ValueError, match="empty"):
        engine.generate_batch(["fine", ""], max_tokens=3)


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_model_path_is_refused(stage):
    with pytest.raises(ValueError, match="model path"):
        stage_engine_class(stage)(model_path="/no/such/model", device="cpu")


@pytest.mark.parametrize("stage", STAGES)
def test_unsupported_architecture_is_refused(stage, checkpoints, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(checkpoints["dense"], tmp_path / "gpt2ish")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        stage_engine_class(stage)(model_path=str(folder), device="cpu")


@pytest.mark.parametrize("stage", STAGES)
def test_a_shut_down_engine_says_so(stage, checkpoints):
    with stage_engine_class(stage)(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        pass
    with pytest.raises(ValueError, match="shut down"):
        engine.generate("x")
