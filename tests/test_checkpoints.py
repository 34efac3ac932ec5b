"""The small test checkpoints are built once and copied after (``tests/checkpoints.py``).

Every pytest process (each xdist worker, each exercise round, ``--stage``) asks for them, and
building one imports transformers' model classes, ~4.5 s of a process's start. A process that
finds them saved must not pay that, and must get the very files the builder saved.
"""

import subprocess
import sys

from conftest import ROOT


def test_a_saved_checkpoint_is_copied_without_importing_transformers_model_code(checkpoints, builtin_folder, tmp_path):
    copy = tmp_path / "dense"  # the session's checkpoints fixture has saved "dense" already
    script = (
        "import sys\n"
        "sys.path[:0] = ['tests', '.']\n"
        "from pathlib import Path\n"
        "from checkpoints import write_checkpoint\n"
        f"write_checkpoint('dense', Path({str(copy)!r}), Path({str(builtin_folder)!r}))\n"
        "print(sorted(name for name in sys.modules if name.startswith('transformers.models')))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout
    saved = sorted(path.name for path in checkpoints["dense"].iterdir())
    assert sorted(path.name for path in copy.iterdir()) == saved
    assert all((copy / name).read_bytes() == (checkpoints["dense"] / name).read_bytes() for name in saved)
