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

# The course's three questions, each answered by one results file pattern and one metric.
SUMMARY = [
    ("Throughput on nano-vllm's workload (H100, 256 requests); colours are separate runs",
     "h100-random256-*.json", "output_tokens_per_s", "output tokens / s (higher is better)"),
    ("Time to first token with 90% of each prompt shared (H100): stage 02 has no prefix cache, stage 03 has one",
     "h100-shared-prefix.json", "ttft_median_ms", "TTFT p50, ms (lower is better)"),
    ("Decode stall when an 8,192-token prompt arrives (H100): stage 04 prefills it whole, stage 05 in chunks",
     "h100-long-prompt.json", "longest_decode_gap_ms", "longest gap between a request's tokens, ms (lower is better)"),
]


def bar_chart(labels: list[str], values: list[float], xlabel: str, groups: list[int] | None = None) -> str:
    """A horizontal bar chart as an inline ``<svg>`` element; ``groups`` colours bars by run."""
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 0.9))
    colours = [f"C{g}" for g in groups] if groups else "C0"
    bars = ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()  # first system on top, as in the table
    ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" for v in values], padding=3)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(values) * 1.18)
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



def summary_charts(results: Path) -> str:
    """Markdown: one titled chart per question in ``SUMMARY`` whose results files exist."""
    sections = []
    for title, pattern, metric, xlabel in SUMMARY:
        labels, values, groups = [], [], []
        for run, path in enumerate(sorted(results.glob(pattern))):
            for r in json.loads(path.read_text())["results"]:
                if r.get(metric) is not None:
                    labels.append(r["system"])
                    values.append(r[metric])
                    groups.append(run)
        if values:
            sections.append(f"#### {title}\n\n" + bar_chart(labels, values, xlabel, groups) + "\n")
    return "\n".join(sections)
