"""Each stage introduces itself: its ``__init__`` docstring opens with its own number and technique.

A new stage starts as a copy of the one before, so its docstring starts as the
old stage's; this catches the copy that was never rewritten.
"""

import ast

import pytest

from conftest import ROOT, STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_the_stage_docstring_names_this_stage_and_no_other(stage):
    docstring = ast.get_docstring(ast.parse((ROOT / stage / "__init__.py").read_text()))
    number = stage[len("stage"):len("stage") + 2]
    assert docstring and docstring.startswith(f"Stage {number} ("), docstring[:80]
    assert "the full system" not in docstring or stage == STAGES[-1]  # only the last stage is the full system
