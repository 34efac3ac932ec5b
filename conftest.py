"""pytest's ``--stage`` option: one stage's tests in one command.

``python -m pytest -q --stage stage05_chunked`` runs that stage's own folder
(tests/stage05_chunked) and every shared case parametrised for it (the ladder,
its walkthrough, the server, the benchmarks harness), and nothing else.
Stage 01's own tests are tests/common: its lesson is the model in common/.

The option lives here, at the top, because pytest must know it before it looks
for tests: otherwise ``--stage stage05_chunked`` reads as a folder to test.
Fixtures live in tests/conftest.py.
"""

import os
from pathlib import Path

import pytest

# pytest-xdist runs a worker per core: each (and every process it starts) gets one thread, or
# torch's thread pools would fight over the cores. Set before anything imports torch.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent
STAGES = sorted(p.name for p in ROOT.glob("stage[0-9][0-9]_*") if (p / "__init__.py").exists())
OWN_TESTS = {"common": "stage01_core"}  # folders under tests/ whose name is not the stage's


def pytest_addoption(parser):
    parser.addoption("--stage", action="append", default=[], metavar="STAGE",
                     help="run only this stage's tests: its own folder and the shared cases parametrised for it "
                          "(may be given more than once)")


def pytest_configure(config):
    unknown = [stage for stage in config.getoption("stage") if stage not in STAGES]
    if unknown:
        raise pytest.UsageError(f"unknown stage {', '.join(unknown)}; the stages are: {', '.join(STAGES)}")


def pytest_collection_modifyitems(config, items):
    chosen = set(config.getoption("stage"))
    if not chosen:
        return
    keep = [item for item in items if stages_of(item) & chosen]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def stages_of(item) -> set[str]:
    """The stages a collected test belongs to: the folder it sits in, stage names among its
    parameters (``stage06_scheduling@schedule_policy=lpm`` names stage06), and walkthrough
    scripts by their number (``03_radix_tree.py`` belongs to stage03)."""
    folder = Path(item.path).relative_to(ROOT / "tests").parts[0] if ROOT / "tests" in Path(item.path).parents else ""
    stages = {OWN_TESTS.get(folder, folder)} & set(STAGES)
    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, Path):
            stages |= {s for s in STAGES if value.name.startswith(s[len("stage"):len("stage") + 2] + "_")}
        elif isinstance(value, str):
            stages |= {s for s in STAGES if value.split("@")[0] == s}
    return stages
