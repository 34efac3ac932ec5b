"""A test that hangs fails within ``TEST_LIMIT_S`` instead of stalling the whole run.

Several tests wait on other processes (servers, gloo workers, nested pytest runs). If one of
them never answers, the run would sit until CI's own limit and print nothing about where. Here
each test (setup, call and teardown) arms ``faulthandler.dump_traceback_later``: past the limit
it writes every thread's stack to a file and ends the process. Under pytest-xdist the
controller then reports the worker as crashed in that test, starts a new worker and goes on;
this module's ``pytest_terminal_summary`` prints the stacks at the end of the run.

tests/conftest.py imports the hooks below, which is how pytest finds them.
"""

import faulthandler
import os
import shutil
import tempfile
from pathlib import Path

# Ten times the slowest test seen on CI (a module whose first test starts a server, or an
# exercise round): long enough never to end a slow test, short enough to leave CI time to finish.
# (The variable is for tests/test_hang_guard.py, which shows the guard at work in a second.)
TEST_LIMIT_S = float(os.environ.get("QWEN3_LADDER_TEST_LIMIT_S", "600"))
FOLDER_VARIABLE = "QWEN3_LADDER_HANG_FOLDER"


_log = None  # this process's file, opened at its first test
_made_folder = False


def pytest_configure(config):
    # The controller picks the folder; xdist's workers, started later, inherit the variable.
    global _made_folder
    if FOLDER_VARIABLE not in os.environ:
        os.environ[FOLDER_VARIABLE] = tempfile.mkdtemp(prefix="qwen3-ladder-hangs-")
        _made_folder = True


def pytest_runtest_setup(item):
    """Arm the guard for this test: its id first in the file, the stacks after it if it hangs."""
    global _log
    if _log is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        _log = open(Path(os.environ[FOLDER_VARIABLE]) / f"{worker}-{os.getpid()}.txt", "w+")  # noqa: SIM115
    _log.seek(0)
    _log.truncate()
    _log.write(f"{item.nodeid} ran for more than {TEST_LIMIT_S:g} s; its process was ended. Stacks:\n")
    _log.flush()
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True, file=_log)


def pytest_unconfigure(config):
    faulthandler.cancel_dump_traceback_later()
    if _made_folder:
        shutil.rmtree(os.environ.pop(FOLDER_VARIABLE), ignore_errors=True)


def pytest_runtest_logfinish(nodeid, location):
    faulthandler.cancel_dump_traceback_later()
    if _log is not None:
        _log.seek(0)
        _log.truncate()


def pytest_terminal_summary(terminalreporter):
    folder = Path(os.environ.get(FOLDER_VARIABLE, ""))
    dumps = [path.read_text() for path in sorted(folder.glob("*.txt"))] if folder.name else []
    for dump in filter(None, dumps):
        terminalreporter.write_sep("=", "a test that hung", red=True)
        terminalreporter.write(dump + "\n")
