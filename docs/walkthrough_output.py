"""Run a walkthrough as a learner would, and keep what each of its code cells printed.

A walkthrough is a jupytext "percent" script: ``# %%`` starts a code cell,
``# %% [markdown]`` a cell of prose. ``cell_outputs`` runs the whole script
with plain ``python`` in a fresh process, from the repository root (so worker
processes and servers it starts behave as on the command line), printing a
marker line after each code cell; the text between markers is that cell's
output. The site shows each output under its cell.

Running all walkthroughs takes minutes on a CPU, so the site never runs them:
it shows the outputs kept in the repository (``docs/walkthroughs/outputs/``),
and a cold ``mkdocs build`` takes seconds. The suite runs every walkthrough
(``tests/test_docs.py``) and fails when what it prints is no longer what is
kept; then ``python docs/walkthrough_output.py --update NAME.py ...`` keeps
the new output (look at the difference first: it is what the page will say).
Runs are cached in ``.cache/walkthroughs/``, keyed by the script and every
source file of the engine. Every run uses one CPU thread, as the suite's
workers do, so that the output is the same whoever runs it.

``run_many`` runs several walkthroughs in one process, one after another,
each in a namespace of its own: the suite does that, since starting Python
with torch and transformers costs seconds a script. A script that fails there
is left uncached, and ``cell_outputs`` runs it alone, where its error shows.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "walkthroughs"
KEPT = ROOT / "docs" / "walkthroughs" / "outputs"  # what the site shows, one JSON list per script
MARKER = "<<<walkthrough cell done>>>"
SCRIPT_DONE, SCRIPT_FAILED = "<<<walkthrough done>>>", "<<<walkthrough failed>>>"
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
    engine_files = sorted(ROOT.glob("common/*.py")) + sorted(ROOT.glob("stage[0-9][0-9]_*/*.py"))
    for path in engine_files + sorted(ROOT.glob("lang/*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cell_outputs(script: Path, timeout: float = 600) -> list[str]:
    """What each code cell of ``script`` printed (cached); raises if the script fails."""
    cached = CACHE / f"{script.stem}-{_cache_key(script)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    cells = code_cells(script)
    # A cold site build runs every walkthrough: say so, so that `mkdocs serve` is not minutes of silence.
    print(f"walkthrough {script.name}: running it ...",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    # Named per process: parallel test workers (and the site build) may run one script at once.
    cells_file = CACHE / f"{script.stem}.cells.{os.getpid()}.json"
    cells_file.write_text(json.dumps(cells))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(script), str(cells_file)], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, check=False, env=env)
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


def kept_outputs(script: Path) -> list[str] | None:
    """The outputs kept in the repository for ``script`` (None if there are none)."""
    path = KEPT / f"{script.stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def site_outputs(script: Path) -> list[str]:
    """What the site shows under each cell: the kept outputs, or (none kept yet) a run's."""
    kept = kept_outputs(script)
    return kept if kept is not None and len(kept) == len(code_cells(script)) else cell_outputs(script)


MANY_DRIVER = f"""
import json, sys, traceback
for path, cells in json.load(open(sys.argv[1])):
    namespace = {{"__name__": "__main__", "__file__": path}}
    try:
        for source in cells:
            exec(compile(source, path, "exec"), namespace)
            print({MARKER!r}, flush=True)
        print({SCRIPT_DONE!r}, flush=True)
    except BaseException:
        traceback.print_exc()
        print({SCRIPT_FAILED!r}, flush=True)
"""


def run_many(scripts: list[Path], timeout: float = 1800) -> None:
    """Run the scripts not cached yet in one process, caching each one's outputs (see the module)."""
    todo = [s for s in scripts if not (CACHE / f"{s.stem}-{_cache_key(s)}.json").exists()]
    if not todo:
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    plan = CACHE / f"many.{os.getpid()}.json"
    plan.write_text(json.dumps([[str(s), code_cells(s)] for s in todo]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MANY_DRIVER, str(plan)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, check=False, env=env)
    plan.unlink()
    # Each script's output ends with its own marker: done, or failed (then left uncached).
    parts = re.split(f"({re.escape(SCRIPT_DONE)}|{re.escape(SCRIPT_FAILED)})\n", result.stdout)
    for script, printed, ending in zip(todo, parts[0::2], parts[1::2]):
        if ending != SCRIPT_DONE:
            continue
        cached = CACHE / f"{script.stem}-{_cache_key(script)}.json"
        staging = cached.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(printed.split(MARKER + "\n")[: len(code_cells(script))]))
        staging.replace(cached)


def update(scripts: list[Path]) -> None:
    """Run ``scripts`` and keep what they print."""
    KEPT.mkdir(parents=True, exist_ok=True)
    for script in scripts:
        (KEPT / f"{script.stem}.json").write_text(json.dumps(cell_outputs(script), indent=1) + "\n")
        print(f"kept {KEPT.relative_to(ROOT) / (script.stem + '.json')}")


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if a != "--update"]
    if "--update" not in sys.argv[1:]:
        sys.exit("usage: python docs/walkthrough_output.py --update [NAME.py ...]   (default: every walkthrough)")
    folder = ROOT / "docs" / "walkthroughs"
    update([folder / Path(n).name for n in names] if names else sorted(folder.glob("[0-9][0-9]_*.py")))
