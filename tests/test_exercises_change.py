"""Every exercise's change is caught: on a scratch copy with it, the tests that judge it fail.

(Without it, the stage as it is, the main suite runs the same tests and they pass;
``test_exercises_answer.py`` checks that a scratch copy is judged like the stage.) The stage
folders never change.

Each pytest process costs seconds to start (torch, transformers, the session's checkpoints), so
the changes run in a few rounds: a round holds changed copies of several stages, at most one
exercise each, and runs all their tests in one process. Neighbouring stages never share a
round, since a stage's tests may use the stage before it as a reference: a broken reference must
not be what fails them.
"""

import hashlib
import re
import shutil
from collections import defaultdict

import pytest

from exercises.catalog import EXERCISES
from exercises.workspace import ROOT, check, scratch_root, start


def digest(stage: str) -> str:
    files = sorted(p for p in (ROOT / stage).rglob("*.py"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def parity(stage: str) -> str:
    """Which rounds a package's exercises join. lang's tests run stages 03 and 19 (odd): it joins the even."""
    return "even" if not stage.startswith("stage") or int(stage[5:7]) % 2 == 0 else "odd"


ROUNDS = defaultdict(list)
for _exercise in EXERCISES:  # the n-th exercise of the odd stages, of the even ones
    ROUNDS[f"exercise {_exercise.number}, {parity(_exercise.stage)} stages"].append(_exercise)


@pytest.mark.parametrize("name", sorted(ROUNDS))
def test_each_change_makes_its_tests_fail(name, tmp_path):
    exercises, together = ROUNDS[name], tmp_path / "round"
    before = {e.stage: digest(e.stage) for e in exercises}
    for exercise in exercises:
        changed = start(exercise, tmp_path)
        assert exercise.replace in changed.read_text()
        shutil.move(scratch_root(exercise, tmp_path) / exercise.stage, together / exercise.stage)
    tests = tuple(test for e in exercises for test in e.tests)
    result = check(exercises[0], tmp_path, tests=tests, scratch=together, extra=("-rfE",))
    assert result.returncode == 1, result.stdout[-3000:]  # 1: tests failed (not a collection error)
    assert not re.search(r"^ERROR ", result.stdout, re.MULTILINE), result.stdout[-3000:]
    failed = set(re.findall(r"^FAILED (\S+)", result.stdout, re.MULTILINE))
    caught = lambda test: any(f == test or f.startswith(test + "[") for f in failed)  # a test id, or all its cases
    missed = [f"{e.stage} {e.number} ({e.title})" for e in exercises if not any(caught(t) for t in e.tests)]
    assert not missed, f"no test caught these changes: {missed}\n{result.stdout[-3000:]}"
    assert {e.stage: digest(e.stage) for e in exercises} == before, "a stage folder itself changed"
