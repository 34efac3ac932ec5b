"""The shape a learner reads: no function of a stage longer than a screen or two."""

import ast

import pytest

from conftest import ROOT, STAGES

MAX_FUNCTION_LINES = 80  # issue 46: a longer function is split into named steps


@pytest.mark.parametrize("stage", STAGES)
def test_no_function_is_longer_than_80_lines(stage):
    long = []
    for path in sorted((ROOT / stage).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"split these into named steps: {long}"
