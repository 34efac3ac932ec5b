"""Every exercise's answer passes. The answer is the stage as it is, and the main suite runs its
tests there; what is left to check is that a scratch copy is judged like the stage itself (one
stage's exercise tests, in one pytest process, pass on an intact copy) and that every test an
exercise names exists (test_exercises_change.py shows each one fails on the changed copy). Also
the command line."""

import re
from pathlib import Path

import pytest

from exercises.__main__ import main
from exercises.catalog import EXERCISES, exercises_of
from exercises.workspace import check, start

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stage", ["stage12_inplace_attention"])  # three exercises, two kinds, a few seconds
def test_the_answer_passes_its_tests(stage, tmp_path):
    first, *_ = exercises_of(stage)
    start(first, tmp_path, change=False)
    tests = tuple(dict.fromkeys(t for e in exercises_of(stage) for t in e.tests))
    result = check(first, tmp_path, tests=tests)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize("test", sorted({t for e in EXERCISES for t in e.tests}))
def test_every_test_an_exercise_names_exists(test):
    path, _, name = test.partition("::")
    function = re.sub(r"\[.*\]$", "", name)
    assert re.search(rf"^def {re.escape(function)}\(", (ROOT / path).read_text(), re.MULTILINE), test


def test_the_command_line_lists_and_refuses(capsys):
    assert main([]) == 0 and "stage12_inplace_attention: 3 exercises" in capsys.readouterr().out
    assert main(["stage03_radix"]) == 0 and "[break it]" in capsys.readouterr().out
    assert main(["start", "stage03_radix", "9"]) == 2 and "no exercise stage03_radix 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stage99_nothing"])


def test_the_exercises_page_lists_every_exercise():
    page = (ROOT / "docs" / "exercises.md").read_text()
    rows = re.findall(r"^\| (\d\d|lang) · [^|]+\| (\d+)\. ([^|]+?) \| ([^|]+?) \|$", page, re.MULTILINE)
    short = lambda stage: stage[5:7] if stage.startswith("stage") else stage
    assert sorted(rows) == sorted((short(e.stage), str(e.number), e.title, e.kind) for e in EXERCISES)
