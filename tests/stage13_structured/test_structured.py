"""Stage 13: outputs that follow a JSON schema, a regex or an EBNF grammar.

The oracles are validators: ``jsonschema`` for schemas, ``re.fullmatch`` for
regular expressions, the grammar's own language for EBNF. Free requests in
the same batches must give stage 12's tokens. The built-in model writes the
constrained outputs, so they are real text, greedy and sampled.
"""

import json
import re

import jsonschema
import pytest

from stage12_inplace_attention import Engine as Stage12Engine
from stage13_structured import Engine, SamplingParams
from stage13_structured.__main__ import build_parser

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pets", "address"],
    "additionalProperties": False,
}
DATE, PHONE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", r"\(\d{3}\) \d{3}-\d{4}"
YES_NO = 'root ::= "yes" | "no"'
FREE = ["Once upon a time", "The three primary colors are"]


def constrained(**kwargs) -> list[tuple[str, SamplingParams]]:
    """Prompts with a grammar each, and the sampling settings given."""
    return [
        ("Describe a person as JSON:", SamplingParams(json_schema=PERSON, max_tokens=120, **kwargs)),
        ("Today's date is", SamplingParams(regex=DATE, max_tokens=20, **kwargs)),
        ("Call me at", SamplingParams(regex=PHONE, max_tokens=20, **kwargs)),
        ("Is the sky blue? Answer:", SamplingParams(ebnf=YES_NO, max_tokens=5, **kwargs)),
    ]


def check_valid(text: str, params: SamplingParams) -> None:
    if params.json_schema is not None:
        jsonschema.validate(json.loads(text), json.loads(params.json_schema))
    elif params.regex is not None:
        assert re.fullmatch(params.regex, text), text
    else:
        assert text in ("yes", "no"), text


@pytest.fixture(scope="module")
def engine(builtin_folder):
    with Engine(device="cpu") as engine:
        yield engine


@pytest.fixture(scope="module")
def stage12_free(builtin_folder):
    with Stage12Engine(device="cpu") as engine:
        return [o.token_ids for o in engine.generate_batch(FREE, max_tokens=16, temperature=0, ignore_eos=True)]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, seed=7)], ids=["greedy", "sampled"])
def test_one_batch_mixes_constrained_and_free_requests(engine, stage12_free, sampling):
    cases = constrained(**sampling)
    free = [(p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)) for p in FREE]
    outputs = engine.generate_batch([p for p, _ in cases + free], [s for _, s in cases + free])
    for (_, params), output in zip(cases, outputs):
        assert output.finish_reason == "stop", (output.text, output.finish_reason)  # the grammar completed
        check_valid(output.text, params)
    assert [o.token_ids for o in outputs[len(cases):]] == stage12_free


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3)], ids=["greedy", "sampled"])
def test_the_masks_alone_keep_a_random_model_in_its_grammar(checkpoints, sampling):
    """A model of random weights knows no dates or phone numbers: what it writes under a grammar
    follows it only because the masks allow nothing else (a tiny checkpoint: a second, not the
    built-in model's minutes; the exercises of this stage are judged by it)."""
    # ASCII digits: ``\d`` is any Unicode digit to the grammar, and a random model finds them.
    date, phone = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
    cases = [("Today:", SamplingParams(regex=date, max_tokens=24, **sampling)),
             ("Call:", SamplingParams(regex=phone, max_tokens=24, **sampling)),
             ("Sky?", SamplingParams(ebnf=YES_NO, max_tokens=5, **sampling))]
    with Engine(model_path=str(checkpoints["dense"]), device="cpu") as engine:
        outputs = engine.generate_batch([p for p, _ in cases], [s for _, s in cases])
    for (_, params), output in zip(cases, outputs):
        assert output.finish_reason == "stop", (output.text, output.finish_reason)
        check_valid(output.text, params)


def count_forwards(engine) -> list[int]:
    """Wrap the runner's launch: one entry per forward, the tokens it fed."""
    fed, launch = [], engine.runner.launch

    def counted(requests, new_lengths):
        fed.append(sum(new_lengths))
        return launch(requests, new_lengths)

    engine.runner.launch = counted
    return fed


def test_jump_forward_gives_the_same_text_in_fewer_forwards(builtin_folder):
    prompts, params = ["Describe a person as JSON:"] * 2, [SamplingParams(json_schema=PERSON, max_tokens=120, temperature=0)] * 2
    runs = {}
    for disable in (True, False):
        with Engine(device="cpu", disable_jump_forward=disable) as engine:
            fed = count_forwards(engine)
            runs[disable] = ([o.text for o in engine.generate_batch(prompts, params)], len(fed), max(fed))
    (free_text, free_forwards, _), (jump_text, jump_forwards, widest) = runs[True], runs[False]
    assert jump_text == free_text
    assert jump_forwards < free_forwards  # forced tokens ("name": ", ...) rode one forward each time
    assert widest > 2  # a step fed several forced tokens of one request


def test_bad_grammars_are_value_errors_naming_the_field_and_the_engine_serves_on(engine):
    before = engine.generate("still fine", max_tokens=6, temperature=0, ignore_eos=True).token_ids
    bad = [
        (dict(json_schema="{not json"), "json_schema is not valid JSON"),
        (dict(json_schema={"type": "nonsense"}), "json_schema does not compile"),
        (dict(regex="(unclosed"), "regex does not compile"),
        (dict(ebnf="root ::= = ="), "ebnf"),
        (dict(regex=r"\d", ebnf=YES_NO), "at most one"),
        (dict(regex=""), "regex"),
        (dict(json_schema=5), "json_schema"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.generate(["a", "b"], max_tokens=4, **kwargs)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.generate("still fine", max_tokens=6, temperature=0, ignore_eos=True).token_ids == before


def test_a_repeated_grammar_compiles_once(engine):
    compiled = engine.grammars.compiled
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    for _ in range(3):
        output = engine.generate("JSON:", json_schema=schema, max_tokens=40, temperature=0)
        assert output.finish_reason == "stop" and json.loads(output.text)["ok"] in (True, False)
    assert engine.grammars.compiled == compiled + 1


def test_max_tokens_and_stop_strings_still_end_a_constrained_request(engine):
    full = engine.generate("Describe a person as JSON:", json_schema=PERSON, max_tokens=120, temperature=0)
    cut = engine.generate("Describe a person as JSON:", json_schema=PERSON, max_tokens=7, temperature=0)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 7
    assert full.token_ids[:7] == cut.token_ids  # forced tokens never overshoot max_tokens
    stopped = engine.generate("Describe a person as JSON:", json_schema=PERSON, max_tokens=120, temperature=0, stop=['"age"'])
    assert stopped.finish_reason == "stop" and full.text.startswith(stopped.text) and '"age"' not in stopped.text


def retract(scheduler, request) -> None:
    """What the scheduler does when the pool runs short: the request's pages go, it waits to be recomputed."""
    scheduler.running.remove(request)
    scheduler.runner.free_cache(request)
    request.num_cached = 0
    scheduler.waiting.appendleft(request)


def test_retraction_mid_grammar_and_a_serial_schedule_keep_the_same_outputs(builtin_folder):
    """Requests retracted halfway through their grammar are recomputed from their tokens (the
    grammar's state stays that of the tokens so far), on a schedule without overlap: the same texts."""
    cases = constrained(temperature=0)
    prompts, params = [p for p, _ in cases], [s for _, s in cases]
    with Engine(device="cpu") as engine:
        expected = [o.text for o in engine.generate_batch(prompts, params)]
    with Engine(device="cpu", disable_overlap_schedule=True) as engine:
        ids = [engine.add_request(p, s) for p, s in cases]
        for _ in range(4):
            engine.step()
        victims = [r for r in engine.scheduler.running if r.output_ids and not r.finished][:2]
        assert victims
        for victim in victims:
            retract(engine.scheduler, victim)
        while engine.scheduler.running or engine.scheduler.waiting:
            engine.step()
        outputs = [engine.get_output(i) for i in ids]
    for (_, p), output, text in zip(cases, outputs, expected):
        check_valid(output.text, p)
        assert output.text == text


def test_an_abort_mid_grammar_frees_everything(engine):
    rid = engine.add_request("Describe a person as JSON:", json_schema=PERSON, max_tokens=120, temperature=0)
    for _ in range(5):
        engine.step()
    engine.abort_request(rid)
    assert engine.get_output(rid).finish_reason == "abort"
    engine.flush_cache()
    assert engine.runner.allocator.num_free == engine.runner.allocator.num_pages


def test_the_command_line_has_the_grammar_flags():
    args = build_parser().parse_args(["hi", "--regex", r"\d+", "--disable-jump-forward"])
    assert args.regex == r"\d+" and args.disable_jump_forward
    assert build_parser().parse_args(["hi"]).json_schema is None
