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


@pytest.fixture(scope="module")
def walkthroughs_run(builtin_folder):
    """Every walkthrough, run once in one process (``run_many``: a Python start with torch costs
    seconds a script); one that fails there runs again alone in its test, where its error shows."""
    walkthrough_output.run_many(WALKTHROUGHS)


@pytest.mark.parametrize("script", WALKTHROUGHS, ids=lambda p: p.name)
def test_walkthrough_runs_with_plain_python(script, walkthroughs_run):
    """Run as a learner would (plain python, from the repository root); its cell outputs are cached
    for the site build below, which shows them under each cell."""
    outputs = walkthrough_output.cell_outputs(script)
    assert len(outputs) == len(walkthrough_output.code_cells(script))
    assert any(out.strip() for out in outputs), "a walkthrough shows something"
    # The site shows the kept output: it must be what the script prints now.
    assert outputs == walkthrough_output.kept_outputs(script), (
        f"{script.name} prints something other than its kept output (docs/walkthroughs/outputs/); look at the "
        f"difference, then: python docs/walkthrough_output.py --update {script.name}")


# A resource the browser would fetch from another host (a font, a script, a stylesheet, an image).
EXTERNAL_RESOURCE = re.compile(r"""<(?:link|script|img|iframe|source)\b[^>]*\b(?:href|src)=["']?(?:https?:)?//""")


def test_site_builds_strict_offline_with_code_that_wraps_and_pages_that_link_up(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site"
    assert (site / "stages" / "01-core" / "index.html").exists()
    fetched = [(str(page.relative_to(site)), match.group(0)) for page in site.rglob("*.html")
               for match in EXTERNAL_RESOURCE.finditer(page.read_text())]
    assert not fetched, f"pages fetch from other hosts: {fetched[:5]}"
    css = "".join(p.read_text() for p in (site / "stylesheets").glob("*.css"))
    assert re.search(r"pre > code \{[^}]*white-space: pre-wrap", css), "code blocks must wrap, not run out of view"
    walkthrough = (site / "walkthroughs" / "03-radix-tree" / "index.html").read_text()
    assert 'class="filename">Output<' in walkthrough  # outputs are labelled
    assert 'href="../../stages/03-radix/"' in walkthrough and 'href="../04-scheduler-trace/"' in walkthrough
    assert 'href="../../exercises/"' in (site / "stages" / "03-radix" / "index.html").read_text()


def test_a_fence_holds_whatever_the_text_inside_it_holds():
    """A model's output (or a docstring) may print a code fence of its own: it must not close ours."""
    for text in ["plain", "```json\n{}\n```", "````", "a ` b `` c"]:
        block = hooks.fenced(text, "text", title="Output")
        fence = block.split("\n", 1)[0].split("text")[0]
        assert block.startswith(fence + 'text title="Output"\n') and block.endswith("\n" + fence)
        assert not any(line.startswith(fence) for line in text.splitlines()), (text, fence)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_page_lists_its_exercises(stage):
    from exercises.catalog import exercises_of

    rendered = hooks.render_exercises(stage)
    assert all(e.title in rendered for e in exercises_of(stage)) and ("exercises.md" in rendered) == bool(exercises_of(stage))




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


@pytest.mark.parametrize("stage", STAGES[1:])
def test_a_stage_diff_shows_the_technique_first_and_folds_the_plumbing(stage):
    rendered = hooks.render_stage_diff(STAGES[STAGES.index(stage) - 1], stage)
    assert rendered.startswith("| file | + | − |")  # the table of files first
    headings = [m.start() for m in re.finditer(r"^### ", rendered, re.MULTILINE)]
    folded = [m.start() for m in re.finditer(r"^\?\?\? note ", rendered, re.MULTILINE)]
    assert not headings or not folded or max(headings) < min(folded), "plumbing files come last, folded"
    for name in hooks.PLUMBING:
        assert f"### `{name}`" not in rendered
    if "(new file)" in rendered:  # a technique that brings files shows them first
        assert rendered[headings[0]:].split("\n", 1)[0].endswith("(new file)")


def test_the_benchmarks_page_opens_with_each_stages_best_gpu_figure_and_names_cpus():
    headline = hooks.render_benchmark_headline()
    runs = re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", headline)
    assert runs and all((ROOT / "benchmarks" / "results" / f"{text}.json").exists() for text, _ in runs)
    assert all(anchor == text or anchor in hooks.SECTION_OF_FOLDER.values() for text, anchor in runs)
    assert all(f"| {n} |" in headline for n in ("14", "15", "16"))  # the last stages have GPU figures
    assert hooks.where_it_ran({"machine": "x86_64", "cpu": "Intel(R) Xeon(R)", "cpu_count": 2}).startswith(
        "CPU Intel(R) Xeon(R), 2 threads")
    assert hooks.where_it_ran({"gpu": "NVIDIA H100", "torch": "2.11"}) == "NVIDIA H100, torch 2.11"


def test_table_code_breaks_between_path_parts_not_inside_words():
    cell = "<td><code>tests/server/test_reliability.py</code> and <code>--max-request-bytes</code></td>"
    out = hooks.TABLE_CELL.sub(hooks.breakable_paths, cell)
    assert "<code>tests/<wbr>server/<wbr>test_<wbr>reliability<wbr>.py</code>" in out
    assert "<code>--max-request-bytes</code>" in out  # a browser breaks after its hyphens already


def test_the_host_cost_table_has_a_row_per_measured_stage():
    report = json.loads((ROOT / hooks.HOST_COST).read_text())
    table = hooks.render_host_cost()
    assert all(f"| `{r['stage']}` |" in table for r in report["summary"]) and "CPU" in table
