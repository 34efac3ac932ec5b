"""tests/hang_guard.py: a test that hangs ends with its stacks printed, and the run goes on."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

HANGING = '''
import threading

def test_hangs():
    threading.Event().wait()  # never set

def test_after_it():
    pass
'''


def test_a_hanging_test_is_ended_and_its_stack_printed(tmp_path):
    (tmp_path / "test_hangs_here.py").write_text(HANGING)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "QWEN3_LADDER_HANG"))}
    env.update(QWEN3_LADDER_TEST_LIMIT_S="3", PYTHONPATH=str(TESTS))
    # The guard alone, as a plugin, on one xdist worker (as in the suite, where workers crash and are replaced).
    command = [sys.executable, "-m", "pytest", "-q", "-c", os.devnull, "--rootdir", str(tmp_path), "-p", "hang_guard",
               "-p", "no:cacheprovider", "-n", "1", "test_hangs_here.py"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert "test_hangs_here.py::test_hangs ran for more than 3 s" in out, out[-3000:]
    assert "in test_hangs" in out, out[-3000:]  # the hanging frame, from faulthandler's dump
    assert "1 passed" in out and "1 failed" in out, out[-3000:]  # the worker was replaced; the next test ran
