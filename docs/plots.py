"""Charts for the benchmarks page, drawn with matplotlib when the site is built.

Each chart is an inline SVG string, so the page needs no image files and no
network. Bars are horizontal: system names stay readable however many there are.
"""

import io
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: draw to files only
import matplotlib.pyplot as plt

plt.rcParams.update({"svg.fonttype": "none", "font.size": 10})  # text stays text: smaller, searchable

# The course's three questions, each answered by the results files of a pattern and one metric.
# Each file is one comparison run (its systems interleaved): it gets a chart of its own, since
# figures from separate runs on a shared machine are not comparable bar to bar.
SUMMARY = [
    ("Throughput on nano-vllm's workload (256 requests)", "h[0-9]*-random256-*.json", "output_tokens_per_s",
     "output tokens / s (higher is better)"),
    ("Time to first token with 90% of each prompt shared: stage 02 has no prefix cache, stage 03 has one",
     "h100-shared-prefix.json", "ttft_median_ms", "TTFT p50, ms (lower is better)"),
    ("Decode stall when an 8,192-token prompt arrives: stage 04 prefills it whole, stage 05 in chunks",
     "h100-long-prompt.json", "longest_decode_gap_ms", "longest gap between a request's tokens, ms (lower is better)"),
    ("Stage 13: half the requests constrained to a JSON schema, against the same lengths unconstrained",
     "structured/h[0-9]*-structured.json", "output_tokens_per_s", "output tokens / s (higher is better)"),
    ("Stage 14: NGRAM speculative decoding against stage 13 on random prompts",
     "speculative/h[0-9]*-random32-*.json", "output_tokens_per_s", "output tokens / s (higher is better)"),
    ("Stage 15: four adapters in one batch against the base model alone",
     "lora/h[0-9]*-random96-stage15.json", "output_tokens_per_s", "output tokens / s (higher is better)"),
    ("Stages 14, 15 and 16 side by side (64 random requests; stage 16 with one replica)",
     "data_parallel/h[0-9]*-random64-stage14-15-16.json", "output_tokens_per_s", "output tokens / s (higher is better)"),
]


def bar_chart(labels: list[str], values: list[float], xlabel: str, spans: list | None = None) -> str:
    """A horizontal bar chart as an inline ``<svg>`` element; ``spans[i]`` = (min, max) of bar i's
    repeats draws a whisker (None: a single run)."""
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 0.9))
    xerr, right = None, max(values)
    if spans and any(spans):
        spans = [span or (v, v) for span, v in zip(spans, values)]
        xerr = [[v - lo for (lo, _), v in zip(spans, values)], [hi - v for (_, hi), v in zip(spans, values)]]
        right = max(hi for _, hi in spans)
    colours = ["C1" if label.startswith("hf-") else "C0" for label in labels]  # transformers' peers stand out
    bars = ax.barh(range(len(labels)), values, color=colours, xerr=xerr, capsize=3 if xerr else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()  # first system on top, as in the table
    ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" for v in values], padding=3)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, right * 1.18)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None})  # no date: a rebuild gives the same page
    plt.close(fig)
    svg = out.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prologue: the element goes inside the page
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)
    # A <div> makes Markdown pass the block through as HTML (a bare <svg> would be wrapped in <p>).
    return f'<div class="chart" markdown="0">\n{svg.strip()}\n</div>'


def spread(runs: list[float] | None) -> tuple[float, float] | None:
    """(min, max) of a repeated system's runs; None for a single run."""
    return (min(runs), max(runs)) if runs and len(runs) > 1 else None


def run_title(path: Path, report: dict) -> str:
    """Where a run ran: the results file, the GPU (or CPU) and the torch version."""
    environment = report.get("environment", {})
    repeats = max((len(r.get("output_tokens_per_s_runs", [])) for r in report["results"]), default=0)
    how = f"median of {repeats} interleaved runs, whiskers min to max" if repeats > 1 else "one run"
    return f"{path.stem}: {environment.get('gpu') or 'CPU'}, torch {environment.get('torch', '?')}, {how}"


def summary_charts(results: Path) -> str:
    """Markdown: for each question in ``SUMMARY``, one titled chart per results file."""
    sections = []
    for question, pattern, metric, xlabel in SUMMARY:
        charts = []
        for path in sorted(results.glob(pattern)):
            report = json.loads(path.read_text())
            rows = [r for r in report["results"] if r.get(metric) is not None]
            if not rows:
                continue
            spans = [spread(r.get(f"{metric}_runs")) for r in rows]
            chart = bar_chart([r["system"] for r in rows], [r[metric] for r in rows], xlabel, spans)
            charts.append(f"**{run_title(path, report)}**\n\n{chart}\n")
        if charts:
            sections.append(f"#### {question}\n\n" + "\n".join(charts))
    return "\n".join(sections)
