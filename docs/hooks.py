"""mkdocs build hooks: pages that are generated from the code at build time, so they never go stale.

Three markers may appear in a page's markdown:
    <!-- stage-diff: stage01_core stage02_paged -->   -> a unified diff per changed file, new files whole
    <!-- walkthrough: 01_forward_pass.py -->          -> the jupytext script rendered as markdown
    <!-- benchmark-results -->                        -> summary charts, then a table and a chart per
                                                           benchmarks/results/*.json (charts: plots.py)
"""

import difflib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plots.py, beside this file
import plots
import walkthrough_output

ROOT = Path(__file__).resolve().parent.parent
DIFF_MARKER = re.compile(r"<!--\s*stage-diff:\s*(\S+)\s+(\S+)\s*-->")
WALKTHROUGH_MARKER = re.compile(r"<!--\s*walkthrough:\s*(\S+)\s*-->")


def stage_files(stage: str) -> dict[str, str]:
    """Relative path -> text of every source file of a stage."""
    folder = ROOT / stage
    return {
        str(p.relative_to(folder)): p.read_text()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def render_stage_diff(before: str, after: str) -> str:
    """Markdown with one ```diff block per changed file; stage names are stripped from imports."""
    old, new = stage_files(before), stage_files(after)
    sections = []
    for name in sorted(old.keys() | new.keys()):
        # Imports name their own stage; drop that so the diff shows only the technique.
        a = old.get(name, "").replace(before, "STAGE")
        b = new.get(name, "").replace(after, "STAGE")
        if a == b:
            continue
        if name not in old:
            sections.append(f"### `{name}` (new file)\n\n```python\n{new[name].rstrip()}\n```\n")
            continue
        diff = difflib.unified_diff(
            a.splitlines(), b.splitlines(), f"{before}/{name}", f"{after}/{name}", lineterm="", n=3
        )
        sections.append(f"### `{name}`\n\n```diff\n" + "\n".join(diff) + "\n```\n")
    if not sections:
        raise ValueError(f"{before} and {after} do not differ: a stage must add a technique")
    return "\n".join(sections)


def render_walkthrough(script: str) -> str:
    """A jupytext percent script as markdown: prose cells as text, code cells as code, each
    followed by what it printed when the script ran (``walkthrough_output.py``)."""
    import jupytext

    path = ROOT / "docs" / "walkthroughs" / script
    outputs = iter(walkthrough_output.cell_outputs(path))
    parts = [f"!!! tip \"Run it\"\n    `python docs/walkthroughs/{script}`\n"]
    for cell in jupytext.read(path).cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source)
        elif cell.cell_type == "code":
            parts.append(f"```python\n{cell.source}\n```")
            printed = next(outputs).rstrip()
            if printed:
                parts.append(f"```text\n{printed}\n```")
    return "\n\n".join(parts) + "\n"


def render_benchmark_results() -> str:
    """The summary charts, then one section per results file: where it ran, a table of the
    systems, a bar chart of output tok/s."""
    sections = ["## Charts\n", plots.summary_charts(ROOT / "benchmarks" / "results"), "## Every run\n"]
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        report = json.loads(path.read_text())
        env = report.get("environment", {})
        where = ", ".join(f"{k} {env[k]}" for k in ("gpu", "torch", "git_commit") if env.get(k))
        rows = ["| system | out tok/s | total tok/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms | peak GiB | notes |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["results"]:
            peak = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r.get("peak_memory_bytes") else ""
            notes = "; ".join(f"{k.replace('_', ' ')} {r[k]}" for k in ("longest_decode_gap_ms", "prefix_cache_hit_rate") if r.get(k))
            rows.append(f"| {r['system']} | {r['output_tokens_per_s']} | {r['total_tokens_per_s']} | {r['ttft_median_ms'] or ''} "
                        f"| {r['itl_median_ms'] or ''} | {r['itl_p99_ms'] or ''} | {peak} | {notes} |")
        runs = [r.get("output_tokens_per_s_runs") for r in report["results"]]
        chart = plots.bar_chart([r["system"] for r in report["results"]], [r["output_tokens_per_s"] for r in report["results"]],
                                "output tokens / s", [plots.spread(v) for v in runs])
        note = f"\n_{env['note']}_\n" if env.get("note") else ""
        kwargs = f"; engine options `{json.dumps(report['engine_kwargs'])}`" if report.get("engine_kwargs") else ""
        sections.append(f"### {path.stem}\n\n{report.get('workload', '')}; model `{report.get('model', '')}`{kwargs}. "
                        f"{where}.\n{note}\n" + "\n".join(rows) + "\n\n" + chart + "\n")
    return "\n".join(sections)


def on_page_markdown(markdown, page, config, files):
    markdown = markdown.replace("<!-- benchmark-results -->", render_benchmark_results()) if "<!-- benchmark-results -->" in markdown else markdown
    markdown = DIFF_MARKER.sub(lambda m: render_stage_diff(m.group(1), m.group(2)), markdown)
    return WALKTHROUGH_MARKER.sub(lambda m: render_walkthrough(m.group(1)), markdown)
