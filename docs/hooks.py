"""mkdocs build hooks: pages that are generated from the code at build time, so they never go stale.

Four markers may appear in a page's markdown (and every stage page gets its exercises, every
walkthrough links to its stage and to the next walkthrough):
    <!-- stage-diff: stage01_core stage02_paged -->   -> a unified diff per changed file, new files whole
    <!-- walkthrough: 01_forward_pass.py -->          -> the jupytext script rendered as markdown
    <!-- benchmark-headline -->                       -> per stage, its best GPU figure and the run it is from
    <!-- benchmark-results -->                        -> summary charts, then a table and a chart per
                                                           benchmarks/results/*.json (charts: plots.py)
"""

import difflib
import json
import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plots.py, beside this file
import plots
import walkthrough_output

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the exercises package
from exercises.catalog import exercises_of

DIFF_MARKER = re.compile(r"<!--\s*stage-diff:\s*(\S+)\s+(\S+)\s*-->")
WALKTHROUGH_MARKER = re.compile(r"<!--\s*walkthrough:\s*(\S+)\s*-->")


def fenced(text: str, language: str, title: str | None = None) -> str:
    """``text`` in a code block whose fence no line of it can close: one backtick longer than the
    longest run of backticks in it (a model's output or a docstring may hold a fence of its own)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    attributes = f' title="{title}"' if title else ""
    return f"{fence}{language}{attributes}\n{text}\n{fence}"


def stage_files(stage: str) -> dict[str, str]:
    """Relative path -> text of every source file of a stage."""
    folder = ROOT / stage
    return {
        str(p.relative_to(folder)): p.read_text()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


# Files that carry a technique's settings and wiring rather than the technique: their diffs are
# folded (a click opens them), after the files that hold the technique.
PLUMBING = ("__init__.py", "__main__.py", "engine_args.py", "server_args.py", "openai_protocol.py")


def render_stage_diff(before: str, after: str) -> str:
    """Markdown for a stage's diff from the one before: a table of the files it changes (new
    files, then the rest by lines changed, +/- each), one block per file in that order, plumbing
    files (``PLUMBING``) folded at the end. Stage names are stripped from imports."""
    old, new = stage_files(before), stage_files(after)
    files = []  # (name, added, removed, block)
    for name in sorted(old.keys() | new.keys()):
        # Imports name their own stage; drop that so the diff shows only the technique.
        a = old.get(name, "").replace(before, "STAGE")
        b = new.get(name, "").replace(after, "STAGE")
        if a == b:
            continue
        if name not in old:
            files.append((name, len(b.splitlines()), 0, fenced(new[name].rstrip(), "python")))
            continue
        diff = list(difflib.unified_diff(a.splitlines(), b.splitlines(), f"{before}/{name}", f"{after}/{name}",
                                         lineterm="", n=3))
        added = sum(line.startswith("+") and not line.startswith("+++") for line in diff)
        removed = sum(line.startswith("-") and not line.startswith("---") for line in diff)
        files.append((name, added, removed, fenced("\n".join(diff), "diff")))
    if not files:
        raise ValueError(f"{before} and {after} do not differ: a stage must add a technique")
    files.sort(key=lambda f: (f[0] in PLUMBING, f[0] in old, -(f[1] + f[2]), f[0]))
    rows = ["| file | + | − |", "| --- | --- | --- |"]
    rows += [f"| `{name}`{' (new file)' if name not in old else ''} | {added} | {removed} |" for name, added, removed, _ in files]
    sections = ["\n".join(rows) + "\n"]
    for name, added, removed, block in files:
        counts = "new file" if name not in old else f"+{added} −{removed}"
        if name in PLUMBING:  # folded: a pymdownx.details block, its body indented
            sections.append(f'??? note "{name} ({counts})"\n\n' + textwrap.indent(block, "    ") + "\n")
        else:
            sections.append(f"### `{name}` ({counts})\n\n{block}\n")
    return "\n".join(sections)


def page_of(folder: str, number: str) -> str | None:
    """The docs page ``folder/NN-*.md`` (relative to docs/), if there is one."""
    pages = sorted((ROOT / "docs" / folder).glob(f"{number}-*.md"))
    return f"{folder}/{pages[0].name}" if pages else None


def render_exercises(stage: str) -> str:
    """A stage page's pointer to its exercises (from exercises/catalog.py), or nothing."""
    exercises = exercises_of(stage)
    if not exercises:
        return ""
    listed = "; ".join(f"{e.number}. {e.title} ({e.kind})" for e in exercises)
    return (f"**Exercises** (`python -m exercises {stage}`; how they work: [exercises](../exercises.md)): "
            f"{listed}.\n")


def render_walkthrough(script: str) -> str:
    """A jupytext percent script as markdown: prose cells as text, code cells as code, each
    followed by what it printed (kept in docs/walkthroughs/outputs/: ``walkthrough_output.py``), then links to
    its stage and to the next walkthrough."""
    import jupytext

    path = ROOT / "docs" / "walkthroughs" / script
    outputs = iter(walkthrough_output.site_outputs(path))
    number = script[:2]
    stage_page, next_page = page_of("stages", number), page_of("walkthroughs", f"{int(number) + 1:02d}")
    parts = [f"!!! tip \"Run it\"\n    `python docs/walkthroughs/{script}`"
             + (f" · the stage: [stage {number}](../{stage_page})" if stage_page else "") + "\n"]
    for cell in jupytext.read(path).cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source)
        elif cell.cell_type == "code":
            parts.append(fenced(cell.source, "python"))
            printed = next(outputs).rstrip()
            if printed:  # labelled, so that what the code printed never reads as more code
                parts.append(fenced(printed, "text", title="Output"))
    links = [f"Back to [stage {number}](../{stage_page})"] if stage_page else []
    if next_page:
        links.append(f"next: [walkthrough {int(number) + 1:02d}](../{next_page})")
    parts.append("---\n\n" + " · ".join(links) + "\n" if links else "")
    return "\n\n".join(parts) + "\n"


STAGE_SYSTEM = re.compile(r"(stage\d\d)_[a-z_]+")
# Results kept in a subfolder are discussed in a section of the page, not listed under "Every run".
SECTION_OF_FOLDER = {"structured": "structured-outputs-stage-13", "speculative": "speculative-decoding-stage-14",
                     "lora": "multi-lora-stage-15", "data_parallel": "data-parallel-replicas-stage-16",
                     "hicache": "hierarchical-cache-stage-17"}


def render_benchmark_headline() -> str:
    """Per stage, its best GPU figure across every results file: output tok/s, the card, the
    workload and a link to the run's section below."""
    best = {}
    results = ROOT / "benchmarks" / "results"
    for path in sorted(results.rglob("*.json")):
        folder = path.parent.relative_to(results).as_posix()
        if folder != "." and folder not in SECTION_OF_FOLDER:
            continue  # correctness checks, profiles, attention probes: no throughput of a stage
        report = json.loads(path.read_text())
        gpu = report.get("environment", {}).get("gpu")
        for r in report["results"] if gpu and isinstance(report.get("results"), list) else []:
            stage = STAGE_SYSTEM.match(r.get("system", ""))
            if stage and r.get("output_tokens_per_s") and r["output_tokens_per_s"] > best.get(stage.group(1), (0,))[0]:
                name = path.stem if folder == "." else f"{folder}/{path.stem}"
                anchor = path.stem if folder == "." else SECTION_OF_FOLDER[folder]
                best[stage.group(1)] = (r["output_tokens_per_s"], gpu, report.get("workload", ""), name, anchor)
    rows = ["| stage | best output tok/s | GPU | workload | run |", "| --- | --- | --- | --- | --- |"]
    for stage, (tokens, gpu, workload, name, anchor) in sorted(best.items()):
        short = workload.split(",")[0] + (f" ({workload.rsplit('(', 1)[1]}" if workload.endswith(")") else "")
        rows.append(f"| {stage[5:]} | {tokens:,.0f} | {gpu.replace('NVIDIA ', '')} | {short} | [{name}](#{anchor}) |")
    return "\n".join(rows) + "\n"


def where_it_ran(env: dict) -> str:
    """The card (GPU runs) or the CPU and its threads (CPU runs), then torch and the commit."""
    machine = env.get("gpu") or f"CPU {env.get('cpu') or env.get('machine', '?')}, {env.get('cpu_count', '?')} threads"
    return ", ".join([machine] + [f"{k} {env[k]}" for k in ("torch", "git_commit") if env.get(k)])


HOST_COST = "benchmarks/results/profiles/cpu-host-cost-ladder.json"


def render_host_cost() -> str:
    """Per stage, a decode step's host work per running request (``benchmarks.host_cost``'s medians)."""
    report = json.loads((ROOT / HOST_COST).read_text())
    rows = ["| stage | greedy: µs per request | sampled (0.7): µs per request | greedy step at 64 requests |",
            "| --- | --- | --- | --- |"]
    rows += [f"| `{r['stage']}` | {r['greedy_us_per_request']:.0f} | {r['sampled_us_per_request']:.0f} | "
             f"{r['greedy_step_ms_at_64']:.1f} ms |" for r in report["summary"]]
    return "\n".join(rows) + f"\n\n{where_it_ran(report['environment'])}; `{HOST_COST}`.\n"


def render_benchmark_results() -> str:
    """The summary charts, then one section per results file: where it ran, a table of the
    systems, a bar chart of output tok/s."""
    sections = ["## Charts\n", plots.summary_charts(ROOT / "benchmarks" / "results"), "## Every run\n"]
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        report = json.loads(path.read_text())
        env = report.get("environment", {})
        where = where_it_ran(env)
        rows = ["| system | out tok/s | total tok/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms | peak GiB |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        notes = []  # below the table, which then fits the column
        for r in report["results"]:
            peak = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r.get("peak_memory_bytes") else ""
            noted = "; ".join(f"{k.replace('_', ' ')} {r[k]}" for k in ("longest_decode_gap_ms", "prefix_cache_hit_rate") if r.get(k))
            rows.append(f"| {r['system']} | {r['output_tokens_per_s']} | {r['total_tokens_per_s']} | {r['ttft_median_ms'] or ''} "
                        f"| {r['itl_median_ms'] or ''} | {r['itl_p99_ms'] or ''} | {peak} |")
            if noted:
                notes.append(f"- {r['system']}: {noted}")
        runs = [r.get("output_tokens_per_s_runs") for r in report["results"]]
        chart = plots.bar_chart([r["system"] for r in report["results"]], [r["output_tokens_per_s"] for r in report["results"]],
                                "output tokens / s", [plots.spread(v) for v in runs])
        note = f"\n_{env['note']}_\n" if env.get("note") else ""
        kwargs = f"; engine options `{json.dumps(report['engine_kwargs'])}`" if report.get("engine_kwargs") else ""
        listed = "\n\n" + "\n".join(notes) if notes else ""
        sections.append(f"### {path.stem}\n\n{report.get('workload', '')}; model `{report.get('model', '')}`{kwargs}. "
                        f"{where}.\n{note}\n" + "\n".join(rows) + listed + "\n\n" + chart + "\n")
    return "\n".join(sections)


TABLE_CELL = re.compile(r"<td\b[^>]*>.*?</td>", re.DOTALL)
CODE_SPAN = re.compile(r"<code>([^<]*)</code>")


def breakable_paths(cell: re.Match) -> str:
    """A table cell's code spans may break after ``/``, ``_``, ``::`` and before a file's suffix
    (``<wbr>``), so a long test path wraps between its parts instead of mid-word ("tests/ladde r/...",
    "reliability.p y")."""
    def breakable(code: str) -> str:
        return re.sub(r"(\.py\b)", r"<wbr>\1", re.sub(r"(/|_|::)", r"\1<wbr>", code))

    return CODE_SPAN.sub(lambda m: "<code>" + breakable(m.group(1)) + "</code>", cell.group(0))


def on_page_content(html, page, config, files):
    return TABLE_CELL.sub(breakable_paths, html)


def on_page_markdown(markdown, page, config, files):
    stage_page = re.fullmatch(r"stages/(\d\d)-.*\.md", page.file.src_uri)
    if stage_page:  # its exercises, before the diff (or at the end of a page without one)
        stage = next(p.name for p in ROOT.glob(f"stage{stage_page.group(1)}_*") if (p / "__init__.py").exists())
        exercises = render_exercises(stage)
        if exercises and "\n## The diff from" in markdown:
            markdown = markdown.replace("\n## The diff from", f"\n{exercises}\n## The diff from", 1)
        elif exercises:
            markdown = markdown.rstrip("\n") + f"\n\n{exercises}"
    if "<!-- host-cost -->" in markdown:
        markdown = markdown.replace("<!-- host-cost -->", render_host_cost())
    if "<!-- benchmark-headline -->" in markdown:
        markdown = markdown.replace("<!-- benchmark-headline -->", render_benchmark_headline())
    markdown = markdown.replace("<!-- benchmark-results -->", render_benchmark_results()) if "<!-- benchmark-results -->" in markdown else markdown
    markdown = DIFF_MARKER.sub(lambda m: render_stage_diff(m.group(1), m.group(2)), markdown)
    return WALKTHROUGH_MARKER.sub(lambda m: render_walkthrough(m.group(1)), markdown)
