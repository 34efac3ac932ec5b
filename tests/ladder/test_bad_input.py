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


# ----- random input: every call either works or raises ValueError, and the engine serves on -----

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.integers(-3, 60),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3), st.text(max_size=4),
    st.lists(st.integers(-5, 10**6), max_size=3), st.lists(st.text(max_size=3), max_size=2),
)
PLAUSIBLE = {  # values a careful user might send
    "max_tokens": st.integers(0, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 60), "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.5, 2),
    "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3), "ignore_eos": st.booleans(),
    "seed": st.one_of(st.none(), st.integers(0, 2**31)),
    "return_logprob": st.booleans(), "top_logprobs_num": st.integers(0, 20), "logprob_start_len": st.integers(-1, 12),
}
# Plausible keywords, then up to two of them (or unknown names) replaced by anything at all.
PARAMS = st.builds(lambda plausible, absurd: {**plausible, **absurd}, st.fixed_dictionaries({}, optional=PLAUSIBLE),
                   st.dictionaries(st.sampled_from([*PLAUSIBLE, "temp", "n"]), ANY_VALUE, max_size=2))
# Mostly plausible values (so that many calls run), some of them just out of range, some absurd.
PROMPTS = st.one_of(
    st.lists(st.integers(0, 49151), min_size=1, max_size=12), st.text(min_size=1, max_size=20),
    st.lists(st.integers(-10, 49160), max_size=12), st.lists(st.integers(-(10**20), 10**20), max_size=3),
    st.lists(st.booleans(), max_size=3), st.floats(), st.none(), st.just(""),
)
BASELINE = {}  # stage -> the tokens of a fixed greedy request, before any random input


# The newest stage gets the most examples; the stages before it, whose checks it carries over, fewer
# (this keeps the suite's time flat as the ladder grows). ``--stage`` still runs a stage's own share.
RANDOM_INPUT_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("stage", STAGES[-1:])
@settings(max_examples=50, **RANDOM_INPUT_SETTINGS)
@given(prompt=PROMPTS, params=PARAMS)
def test_random_input_works_or_raises_value_error_and_the_engine_still_serves(stage, engine_for, prompt, params):
    check_random_input(engine_for(stage, "dense"), stage, prompt, params)


@pytest.mark.parametrize("stage", STAGES[:-1])
@settings(max_examples=15, **RANDOM_INPUT_SETTINGS)
@given(prompt=PROMPTS, params=PARAMS)
def test_random_input_to_an_earlier_stage_works_or_raises_value_error(stage, engine_for, prompt, params):
    check_random_input(engine_for(stage, "dense"), stage, prompt, params)


def check_random_input(engine, stage: str, prompt, params: dict) -> None:
    """The call works or raises ValueError; either way a fixed greedy request then gives its tokens."""
    if stage not in BASELINE:
        BASELINE[stage] = engine.generate("still fine", max_tokens=4, temperature=0, ignore_eos=True).token_ids
    params = dict(params)
    if isinstance(params.get("max_tokens"), int) and not isinstance(params["max_tokens"], bool):
        params["max_tokens"] = min(params["max_tokens"], 8)  # a huge budget is valid, just slow here
    try:
        out = engine.generate(prompt, **params)
    except ValueError:
        event("refused")
    else:
        event("served")
        assert len(out.token_ids) <= params.get("max_tokens", 128)
        assert all(0 <= t < engine.config.vocab_size for t in out.token_ids)
    after = engine.generate("still fine", max_tokens=4, temperature=0, ignore_eos=True)
    assert after.token_ids == BASELINE[stage]


# ----- the command line: each bad flag value gets a clear message on stderr and exit status 2 -----

BAD_FLAGS = [
    (["--max-tokens", "-1"], "max_tokens"), (["--temperature", "nan"], "temperature"), (["--top-p", "0"], "top_p"),
    (["--top-k", "-7"], "top_k"), (["--min-p", "2"], "min_p"), (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--frequency-penalty", "3"], "frequency_penalty"), (["--presence-penalty", "-3"], "presence_penalty"),
    (["--stop", ""], "stop"), (["--context-length", "0"], "context_length"), (["--device", "tpu"], "device"),
    (["--model-path", "/no/such/model"], "model path"), (["--page-size", "0"], "page_size"),
    (["--kv-cache-bytes", "10"], "kv_cache_bytes"), (["--max-prefill-tokens", "0"], "max_prefill_tokens"),
    (["--chunked-prefill-size", "0"], "chunked_prefill_size"), (["--tp-size", "0"], "tp_size"),
    (["--ep-size", "0"], "ep_size"), (["--nnodes", "0"], "nnodes"), (["--base-gpu-id", "-1"], "base_gpu_id"), (["--cuda-graph-max-bs", "0"], "cuda_graph_max_bs"),
    (["--attention-backend", "flash"], "invalid choice"),
    (["--temperature", "hot"], "invalid float value"), (["--dtype", "int8"], "invalid choice"),
]


@pytest.mark.parametrize("stage", STAGES)
def test_every_bad_flag_gets_a_clear_error_and_status_2(stage, checkpoints, capsys):
    import importlib

    cli = importlib.import_module(f"{stage}.__main__")
    known = cli.build_parser()._option_string_actions
    tried = 0
    for flags, message in BAD_FLAGS + [([], "empty")]:
        if flags and flags[0] not in known:
            continue  # a later stage's flag
        prompt = "hello" if flags else ""
        argv = [prompt, "--max-tokens", "2"] + (["--model-path", str(checkpoints["dense"])] if "--model-path" not in flags else []) + flags
        try:
            status = cli.main(argv)
        except SystemExit as exit_:  # argparse refuses values of the wrong type itself
            status = exit_.code
        err = capsys.readouterr().err
        assert status == 2, (flags, err)
        assert message in err and "Traceback" not in err, (flags, err)
        tried += 1
    assert tried >= 12
    # A bad sampling value is refused before the model loads (here, a model that is not there).
    assert cli.main(["hello", "--top-p", "0", "--model-path", "/no/such/model"]) == 2
    assert "top_p" in capsys.readouterr().err
