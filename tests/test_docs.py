"""The course site builds cleanly, every stage has a page, and every walkthrough runs."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, STAGES

sys.path.insert(0, str(ROOT / "docs"))
import hooks
import walkthrough_output

WALKTHROUGHS = sorted((ROOT / "docs" / "walkthroughs").glob("*.py"))


def stage_page(stage: str):
    number = stage[len("stage") : len("stage") + 2]
    pages = sorted((ROOT / "docs" / "stages").glob(f"{number}-*.md"))
    assert pages, f"{stage} has no page docs/stages/{number}-*.md"
    return pages[0]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_page_in_the_navigation(stage):
    page = stage_page(stage)
    assert f"stages/{page.name}" in (ROOT / "mkdocs.yml").read_text()


@pytest.mark.parametrize("stage", STAGES[1:])
def test_every_later_stage_page_renders_a_non_empty_diff_from_the_stage_before(stage):
    before = STAGES[STAGES.index(stage) - 1]
    text = stage_page(stage).read_text()
    assert re.search(rf"<!--\s*stage-diff:\s*{before}\s+{stage}\s*-->", text), f"{stage}'s page lacks its diff marker"
    assert "```diff" in hooks.render_stage_diff(before, stage) or "(new file)" in hooks.render_stage_diff(before, stage)


def test_identical_stages_are_refused_by_the_diff_renderer():
    with pytest.raises(ValueError, match="do not differ"):
        hooks.render_stage_diff(STAGES[0], STAGES[0])


@pytest.mark.parametrize("script", WALKTHROUGHS, ids=lambda p: p.name)
def test_walkthrough_runs_with_plain_python(script, builtin_folder):
    """Run as a learner would (plain python, from the repository root); its cell outputs are cached
    for the site build below, which shows them under each cell."""
    outputs = walkthrough_output.cell_outputs(script)
    assert len(outputs) == len(walkthrough_output.code_cells(script))
    assert any(out.strip() for out in outputs), "a walkthrough shows something"


def test_site_builds_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "stages" / "01-core" / "index.html").exists()




@pytest.mark.parametrize("script", WALKTHROUGHS, ids=lambda p: p.name)
def test_walkthrough_has_a_page(script):
    pages = [p.read_text() for p in (ROOT / "docs" / "walkthroughs").glob("*.md")]
    assert any(f"walkthrough: {script.name}" in page for page in pages)


def test_every_benchmark_result_renders_on_the_results_page():
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    page = hooks.render_benchmark_results()
    assert files and all(f"### {f.stem}" in page for f in files)


def test_each_comparison_run_gets_a_chart_of_its_own(tmp_path):
    """Two runs of the same systems are two charts (bars of separate runs are not comparable), each
    titled with its GPU and torch; a repeated run shows its median with whiskers."""
    import plots

    def write(name: str, systems: dict, runs: dict | None = None):
        results = [{"system": s, "output_tokens_per_s": v, **({"output_tokens_per_s_runs": runs[s]} if runs else {})}
                   for s, v in systems.items()]
        environment = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130"}
        (tmp_path / f"{name}.json").write_text(json.dumps({"environment": environment, "results": results}))

    write("h100-random256-a", {"stage10_overlap": 6000.0, "hf-generate": 600.0})
    write("h100-random256-b", {"stage10_overlap": 6100.0, "stage11_server": 6200.0},
          runs={"stage10_overlap": [5900.0, 6100.0, 6300.0], "stage11_server": [6000.0, 6200.0, 6400.0]})
    page = plots.summary_charts(tmp_path)
    assert page.count("<svg") == 2
    assert "h100-random256-a: NVIDIA H200, torch 2.11.0+cu130, one run" in page
    assert "h100-random256-b: NVIDIA H200, torch 2.11.0+cu130, median of 3 interleaved runs" in page
    first, second = page.split("h100-random256-b")
    assert "hf-generate" in first and "stage11_server" not in first and "hf-generate" not in second
