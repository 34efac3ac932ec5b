"""Every exercise's change is caught: on a scratch copy with it, the tests that judge it fail.

(Without it, the stage as it is, the main suite runs the same tests and they pass;
``test_exercises_answer.py`` checks that a scratch copy is judged like the stage.) Each case runs pytest
in a process of its own, pointed at the scratch copy; the stage folders never change.
"""

import hashlib

import pytest

from exercises.catalog import EXERCISES, find
from exercises.workspace import ROOT, check, start


def digest(stage: str) -> str:
    files = sorted(p for p in (ROOT / stage).rglob("*.py"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


@pytest.mark.parametrize("case", [f"{e.stage}@{e.number}" for e in EXERCISES])
def test_the_change_makes_its_tests_fail(case, tmp_path):
    stage, number = case.split("@")
    exercise = find(stage, int(number))
    before = digest(stage)
    changed = start(exercise, tmp_path)
    assert exercise.replace in changed.read_text()
    result = check(exercise, tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]  # 1: tests failed (not a collection error)
    assert "failed" in result.stdout.splitlines()[-1]
    assert digest(stage) == before, "the stage folder itself changed"
