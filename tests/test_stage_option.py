"""``--stage``: one stage's own tests and every shared case parametrised for it, nothing else."""

import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ROOT, STAGES

spec = importlib.util.spec_from_file_location("stage_option", ROOT / "conftest.py")
stage_option = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_option)


@dataclass
class CallSpec:
    params: dict = field(default_factory=dict)


@dataclass
class Item:
    """What ``stages_of`` reads of a collected test."""

    path: Path
    callspec: CallSpec = field(default_factory=CallSpec)


def test_a_stage_owns_its_folder_and_stage01_owns_the_common_tests():
    assert stage_option.stages_of(Item(ROOT / "tests" / "stage03_radix" / "test_radix_tree.py")) == {"stage03_radix"}
    assert stage_option.stages_of(Item(ROOT / "tests" / "common" / "test_rope.py")) == {"stage01_core"}


def test_a_shared_case_belongs_to_the_stages_it_is_parametrised_for():
    ladder = ROOT / "tests" / "ladder" / "test_parity.py"
    assert stage_option.stages_of(Item(ladder, CallSpec({"stage": "stage05_chunked", "kind": "moe"}))) == {"stage05_chunked"}
    harness = Item(ROOT / "tests" / "test_benchmarks.py", CallSpec({"system": "stage06_scheduling@schedule_policy=lpm"}))
    assert stage_option.stages_of(harness) == {"stage06_scheduling"}
    walkthrough = Item(ROOT / "tests" / "test_docs.py", CallSpec({"script": ROOT / "docs" / "walkthroughs" / "04_scheduler_trace.py"}))
    assert stage_option.stages_of(walkthrough) == {"stage04_batching"}
    assert stage_option.stages_of(Item(ROOT / "tests" / "test_docs.py")) == set()  # the site build is no stage's
    assert stage_option.stages_of(Item(ladder, CallSpec({"stage": "hf-generate"}))) == set()


def test_an_unknown_stage_is_an_error_that_lists_the_stages():
    result = subprocess.run([sys.executable, "-m", "pytest", "--stage", "stage99_nothing", "--co", "-q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 4  # pytest's usage error
    assert "unknown stage stage99_nothing" in result.stderr and all(stage in result.stderr for stage in STAGES)
