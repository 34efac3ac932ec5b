"""Scratch copies of a stage and the test runs that judge them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .catalog import Exercise

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "exercise-work"  # ignored by git


def scratch_root(exercise: Exercise, work: Path = WORK) -> Path:
    """The folder put first on the tests' import path: it holds one package, the stage's copy."""
    return work / f"{exercise.stage}-{exercise.number}"


def start(exercise: Exercise, work: Path = WORK, change: bool = True) -> Path:
    """A fresh scratch copy of the stage with the exercise's change in it (``change=False``: as it
    is, the answer). Returns the copied file the exercise is about."""
    source = ROOT / exercise.stage / exercise.file
    text = source.read_text()
    if text.count(exercise.find) != 1:
        raise RuntimeError(f"{exercise.stage}/{exercise.file} no longer holds the exercise's text exactly once")
    root = scratch_root(exercise, work)
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(ROOT / exercise.stage, root / exercise.stage, ignore=shutil.ignore_patterns("__pycache__"))
    target = root / exercise.stage / exercise.file
    if change:
        target.write_text(text.replace(exercise.find, exercise.replace))
    return target


def check(exercise: Exercise, work: Path = WORK, quiet: bool = True, tests: tuple[str, ...] | None = None,
          scratch: Path | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the exercise's tests (or ``tests``) against its scratch copy (one process, no xdist).
    ``scratch``: another folder of stage copies to put first on the import path (the CI checks
    several exercises of different stages in one process). Exit status 0: they pass; 1: some fail."""
    root = scratch or scratch_root(exercise, work)
    if not (root / exercise.stage).exists():
        raise RuntimeError(f"no scratch copy at {root}: run `python -m exercises start {exercise.stage} {exercise.number}` first")
    env = dict(os.environ, QWEN3_LADDER_SCRATCH=str(root), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", *extra, *(tests or exercise.tests)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=quiet, text=True, check=False)
