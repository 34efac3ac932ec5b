"""Every stage serves the real built-in model, from Python and from the shell."""

import importlib
import subprocess
import sys

import pytest

from conftest import ROOT, STAGES, stage_engine_class


@pytest.fixture(scope="module", params=STAGES)
def builtin_engine(request, builtin_folder):
    with stage_engine_class(request.param)(device="cpu") as engine:
        yield engine


def test_capital_of_france_is_paris(builtin_engine):
    out = builtin_engine.generate("The capital of France is", max_tokens=3, temperature=0)
    assert out.text.strip().startswith("Paris")


def test_chat_template_gives_an_answer(builtin_engine):
    prompt = builtin_engine.tokenizer.apply_chat_template("What is the capital of France?")
    out = builtin_engine.generate(prompt, max_tokens=20, temperature=0)
    assert "Paris" in out.text


@pytest.mark.where_changed("__main__.py")  # the engine behind it: test_capital_of_france_is_paris, every stage
@pytest.mark.parametrize("stage", STAGES)
def test_command_line_prints_the_continuation(stage, builtin_folder, capsys):
    """From the shell for the first and the newest stage; the others whose command line changed run
    the same ``main()`` in-process (a new python costs seconds, and every stage's ``python -m`` line
    is the same)."""
    args = ["The capital of France is", "--max-tokens", "3", "--device", "cpu"]
    if stage in (STAGES[0], STAGES[-1]):
        result = subprocess.run([sys.executable, "-m", stage, *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        printed = result.stdout
    else:
        assert importlib.import_module(f"{stage}.__main__").main(args) == 0
        printed = capsys.readouterr().out
    assert "Paris" in printed
    # (Bad flag values, status 2 and no traceback: test_bad_input.py, through the same main() in-process.)
