"""Run a walkthrough as a learner would, and keep what each of its code cells printed.

A walkthrough is a jupytext "percent" script: ``# %%`` starts a code cell,
``# %% [markdown]`` a cell of prose. ``cell_outputs`` runs the whole script
with plain ``python`` in a fresh process, from the repository root (so worker
processes and servers it starts behave as on the command line), printing a
marker line after each code cell; the text between markers is that cell's
output. The site shows each output under its cell.

Running all walkthroughs takes a few minutes on a CPU, so outputs are cached
in ``.cache/walkthroughs/``, keyed by the script and every source file of the
engine: change either and the walkthrough runs again.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "walkthroughs"
MARKER = "<<<walkthrough cell done>>>"
# Runs the cells in one namespace, as `python script.py` would run the file.
DRIVER = f"""
import json, sys
path, cells = sys.argv[1], json.load(open(sys.argv[2]))
namespace = {{"__name__": "__main__", "__file__": path}}
for source in cells:
    exec(compile(source, path, "exec"), namespace)
    print({MARKER!r}, flush=True)
"""


def code_cells(script: Path) -> list[str]:
    return [cell.source for cell in jupytext.read(script).cells if cell.cell_type == "code"]


def _cache_key(script: Path) -> str:
    digest = hashlib.sha256(script.read_bytes())
    for path in sorted(ROOT.glob("common/*.py")) + sorted(ROOT.glob("stage[0-9][0-9]_*/*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cell_outputs(script: Path, timeout: float = 600) -> list[str]:
    """What each code cell of ``script`` printed (cached); raises if the script fails."""
    cached = CACHE / f"{script.stem}-{_cache_key(script)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    cells = code_cells(script)
    # A cold site build runs every walkthrough: say so, so that `mkdocs serve` is not minutes of silence.
    print(f"walkthrough {script.name}: running it (the code changed since its output was cached) ...",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    # Named per process: parallel test workers (and the site build) may run one script at once.
    cells_file = CACHE / f"{script.stem}.cells.{os.getpid()}.json"
    cells_file.write_text(json.dumps(cells))
    result = subprocess.run([sys.executable, "-c", DRIVER, str(script), str(cells_file)], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    cells_file.unlink()
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} failed:\n{result.stderr[-3000:]}")
    outputs = result.stdout.split(MARKER + "\n")[: len(cells)]
    if len(outputs) != len(cells):
        raise RuntimeError(f"{script.name}: {len(cells)} code cells but {len(outputs)} outputs")
    staging = cached.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(outputs))
    staging.replace(cached)  # atomic: a reader never sees half a file
    print(f"walkthrough {script.name}: done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return outputs
