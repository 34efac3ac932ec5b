"""Session-wide fixtures: the built-in model folder and the random test checkpoints.

(``--stage``, which picks one stage's tests, lives in the repository's top conftest.py.)
"""

import dataclasses
import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "ladder"))
sys.path.insert(0, str(ROOT / "tests" / "server"))
# ``python -m exercises check`` points the tests at a scratch copy of a stage (exercises/): its folder
# comes first, so ``import stage03_radix`` finds the copy.
if os.environ.get("QWEN3_LADDER_SCRATCH"):
    sys.path.insert(0, os.environ["QWEN3_LADDER_SCRATCH"])

import hang_guard
from checkpoints import KINDS, write_checkpoint
from common.loader import resolve_model_path
from hang_guard import pytest_runtest_logfinish, pytest_runtest_setup, pytest_terminal_summary, pytest_unconfigure  # noqa: F401 (hooks)

# Every stage folder present; shared end-to-end tests run once per stage.
STAGES = sorted(p.name for p in ROOT.glob("stage[0-9][0-9]_*") if (p / "__init__.py").exists())
SERVER_STAGES = [s for s in STAGES if (ROOT / s / "http_server.py").exists()]  # stage 11 on


def pytest_configure(config):
    hang_guard.pytest_configure(config)
    config.addinivalue_line("markers", "every_serving_stage: a server test that runs for every serving stage, "
                                       "not only the newest")
    config.addinivalue_line("markers", "where_changed(*files): a test of each stage (parameter 'stage') that the "
                                       "full suite runs only for the newest stage and the stages where one of "
                                       "these files differs from the stage before's")


# The front end: what a serving stage's server tests exercise beyond its engine (metrics.py, which some
# stages extend, has tests of its own in those stages' folders). Not openai_protocol.py: a stage that
# changes only what a request may ask for (stage 13's response_format) sends it through the server in
# its own feature's tests (test_structured_server.py), and the newest stage runs every test on it.
FRONT_END_FILES = ("http_server.py", "tokenizer_manager.py", "openai_choices.py",
                   "engine_process.py", "engine_supervisor.py", "engine_handle.py", "request_body.py", "api_key.py",
                   "server_args.py", "reasoning_parser.py", "tool_parser.py", "native_api.py")


def files_changed(stage: str, files) -> bool:
    """Does one of ``files`` in ``stage`` differ from the stage before's (or is new there)?"""
    index = STAGES.index(stage)
    if index == 0:
        return True
    before = ROOT / STAGES[index - 1]
    return any(not (before / f).exists() or (before / f).read_bytes() != (ROOT / stage / f).read_bytes()
               for f in files if (ROOT / stage / f).exists())


def front_end_changed(stage: str) -> bool:
    """Is ``stage`` the first serving stage, or does its front end differ from the stage before it?
    (And from the newest stage's, which runs every server test anyway.)"""
    newest = ROOT / SERVER_STAGES[-1]
    same_as_newest = all((newest / f).exists() == (ROOT / stage / f).exists() and
                         (not (newest / f).exists() or (newest / f).read_bytes() == (ROOT / stage / f).read_bytes())
                         for f in FRONT_END_FILES)
    return files_changed(stage, FRONT_END_FILES) and not same_as_newest


@pytest.hookimpl(trylast=True)  # after --stage has picked its tests
def pytest_collection_modifyitems(config, items):
    """The newest serving stage runs every server test; an earlier one runs a few, or none. A test
    marked ``where_changed(files)`` runs for the newest stage and where those files changed.

    The server files change little from one stage to the next, so this keeps
    the suite's time flat as the ladder grows: an earlier serving stage whose
    front end differs from the stage before it (``front_end_changed``) runs
    the tests marked ``every_serving_stage`` (a request of each kind: plain,
    streamed, chat, aborted, scored, a tool call, refused); one whose front
    end is the stage before's, or the newest stage's, byte for byte, runs none
    (its engine is the ladder's to test, in process). With ``--stage stage12_inplace_attention``
    a learner still gets all of that stage's server tests, and a test named on
    the command line (``path::test[stage11_server]``) always runs.
    """
    if config.getoption("stage") or any("::" in arg for arg in config.args):
        return

    def dropped(item) -> bool:
        if (marker := item.get_closest_marker("where_changed")) is not None:
            stage = item.callspec.params["stage"]
            return stage != STAGES[-1] and not files_changed(stage, marker.args)
        stage = getattr(item, "callspec", None) and item.callspec.params.get("server_stage", SERVER_STAGES[-1])
        if not stage or stage == SERVER_STAGES[-1]:
            return False
        return item.get_closest_marker("every_serving_stage") is None or not front_end_changed(stage)

    older = {item for item in items if dropped(item)}
    if older:
        config.hook.pytest_deselected(items=list(older))
        items[:] = [item for item in items if item not in older]


def stage_engine_class(stage: str):
    return importlib.import_module(stage).Engine


def stage_has(stage: str, setting: str, choice: str | None = None) -> bool:
    """Whether ``stage`` has the setting (an EngineArgs field, so an Engine keyword and a flag), and
    ``choice`` among its values when one is given: the one way a shared test decides from which
    stage on it applies (``page_size`` from stage 02, ``attention_backend="runs"`` from 12, ...)."""
    engine_args = importlib.import_module(f"{stage}.engine_args").EngineArgs
    fields = {field.name: field for field in dataclasses.fields(engine_args)}
    return setting in fields and (choice is None or choice in (fields[setting].metadata.get("choices") or ()))


@pytest.fixture(scope="session")
def builtin_folder() -> Path:
    """The built-in SmolLM2 model, converted once to safetensors."""
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, builtin_folder) -> dict[str, Path]:
    """kind -> folder of a small random checkpoint ("dense", "moe", "llama")."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: write_checkpoint(kind, root / kind, builtin_folder) for kind in KINDS}


@pytest.fixture(scope="session")
def engine_for(checkpoints):
    """engine_for(stage, kind, **engine_kwargs) -> an Engine, built once per arguments."""
    engines = {}

    def get(stage: str, kind: str, **kwargs):
        key = (stage, kind, tuple(sorted(kwargs.items())))
        if key not in engines:
            engines[key] = stage_engine_class(stage)(model_path=str(checkpoints[kind]), device="cpu", **kwargs)
        return engines[key]

    yield get
    for engine in engines.values():
        engine.shutdown()
