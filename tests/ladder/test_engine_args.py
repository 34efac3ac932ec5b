"""Each stage's settings (engine_args.py): the stage's flags and Engine keywords come from them."""

import dataclasses
import importlib

import pytest

from conftest import STAGES, stage_engine_class


def settings_of(stage: str) -> dict:
    return {f.name: f for f in dataclasses.fields(importlib.import_module(f"{stage}.engine_args").EngineArgs)}


@pytest.mark.parametrize("stage", STAGES)
def test_every_setting_is_a_flag_of_the_stage(stage):
    parser = importlib.import_module(f"{stage}.__main__").build_parser()
    flags = parser._option_string_actions
    for name, field in settings_of(stage).items():
        action = flags["--" + name.replace("_", "-")]
        assert action.dest == name and (action.default == field.default or field.type is bool), name


@pytest.mark.parametrize("stage", STAGES[1:])
def test_a_stage_keeps_the_settings_before_it_and_their_defaults(stage):
    before, now = settings_of(STAGES[STAGES.index(stage) - 1]), settings_of(stage)
    assert set(before) <= set(now)
    assert all(now[name].default == field.default for name, field in before.items())


@pytest.mark.parametrize("stage", STAGES)
def test_the_engine_refuses_an_unknown_or_ill_typed_setting_before_loading(stage):
    engine_class = stage_engine_class(stage)
    with pytest.raises(ValueError, match="'contxt_length' is not a setting of this engine; did you mean 'context_length'"):
        engine_class(contxt_length=8)
    with pytest.raises(ValueError, match="context_length=True must be an integer or None"):
        engine_class(context_length=True)
    with pytest.raises(ValueError, match="seed=1.5 must be an integer or None"):
        engine_class(seed=1.5)
