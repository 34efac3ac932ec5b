"""Every third-party module the project imports is declared in pyproject.toml.

A module that is installed only because this machine happens to have it (or
because another package pulled it in) works here and fails on a fresh machine.
So this test reads every ``import`` in the project's Python files (engine,
tests, docs, benchmarks, exercises), keeps the ones that are neither the
standard library nor the project's own, finds the distribution that installs
each, and checks that pyproject.toml names it in ``dependencies`` or an extra.
A module that no installed distribution provides is reported too: it cannot
have been declared, or the README's install command would have installed it.
"""

import ast
import importlib.metadata
import re
import sys

import pytest

from conftest import ROOT

BUILT_FOLDERS = {"build", "site", "exercise-work"}  # made by the site build and the exercises, not written


def project_files() -> list:
    """The repository's Python files, outside hidden folders (virtual environments, caches, .git)."""
    return [path for path in ROOT.rglob("*.py")
            if not any(part.startswith(".") or part in BUILT_FOLDERS for part in path.relative_to(ROOT).parts[:-1])]


def own_names() -> set[str]:
    """Top-level names that resolve inside the repository: its packages, and every module file,
    since tests and docs put their folders on sys.path (``import checkpoints``, ``import plots``)."""
    names = {path.name for path in ROOT.iterdir() if path.is_dir()}
    return names | {path.stem for path in project_files()}


def imported_names(path) -> set[str]:
    """The top-level modules a file imports (relative imports are the project's own)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Prometheus_Client`` == ``prometheus-client``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()) for requirement in requirements}


def third_party_imports() -> dict[str, list[str]]:
    """Module name -> the files that import it, for modules outside the standard library and the project."""
    ours, users = own_names(), {}
    for path in project_files():
        for name in imported_names(path) - ours - set(sys.stdlib_module_names) - {"__future__"}:
            users.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return users


def test_every_imported_third_party_module_is_declared():
    providers = importlib.metadata.packages_distributions()  # module name -> the distributions installing it
    declared = declared_distributions()
    missing = []
    for module, files in sorted(third_party_imports().items()):
        distributions = {normalized(d) for d in providers.get(module, [])}
        if not distributions & declared:
            where = f"installed by {', '.join(sorted(distributions))}" if distributions else "not installed"
            missing.append(f"{module} ({where}; imported by {', '.join(sorted(files)[:3])})")
    assert not missing, ("imported but not declared in pyproject.toml's dependencies or an extra; add the "
                         "distribution there:\n  " + "\n  ".join(missing))


def test_the_check_sees_a_third_party_import(tmp_path):
    """The scan itself: it finds a plain and a dotted third-party import, and skips relative ones."""
    source = tmp_path / "example.py"
    source.write_text("import numpy as np\nfrom peft.tuners import lora\nfrom . import sibling\nimport os\n")
    assert imported_names(source) == {"numpy", "peft", "os"}
