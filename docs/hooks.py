"""mkdocs build hooks: pages that are generated from the code at build time, so they never go stale.

Two markers may appear in a page's markdown:
    <!-- stage-diff: stage01_core stage02_paged -->   -> a unified diff per changed file, new files whole
    <!-- walkthrough: 01_forward_pass.py -->          -> the jupytext script rendered as markdown
"""

import difflib
import re
from pathlib import Path

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
    """A jupytext percent script as markdown (markdown cells as text, code cells as code)."""
    import jupytext

    notebook = jupytext.read(ROOT / "docs" / "walkthroughs" / script)
    note = f"!!! tip \"Run it\"\n    `python docs/walkthroughs/{script}`\n"
    return note + "\n" + jupytext.writes(notebook, fmt="md").split("---\n", 2)[-1]


def on_page_markdown(markdown, page, config, files):
    markdown = DIFF_MARKER.sub(lambda m: render_stage_diff(m.group(1), m.group(2)), markdown)
    return WALKTHROUGH_MARKER.sub(lambda m: render_walkthrough(m.group(1)), markdown)
