"""Every exercise's answer passes: on a scratch copy of the stage as it is, all the tests that
judge its exercises pass (one pytest process per stage). Also the command line."""

import pytest

from exercises.__main__ import main
from exercises.catalog import EXERCISES, exercises_of
from exercises.workspace import check, start


@pytest.mark.parametrize("stage", sorted({e.stage for e in EXERCISES}))
def test_the_answer_passes_its_tests(stage, tmp_path):
    first, *_ = exercises_of(stage)
    start(first, tmp_path, change=False)
    tests = tuple(dict.fromkeys(t for e in exercises_of(stage) for t in e.tests))
    result = check(first, tmp_path, tests=tests)
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_command_line_lists_and_refuses(capsys):
    assert main([]) == 0 and "stage12_inplace_attention: 3 exercises" in capsys.readouterr().out
    assert main(["stage03_radix"]) == 0 and "[break it]" in capsys.readouterr().out
    assert main(["start", "stage03_radix", "9"]) == 2 and "no exercise stage03_radix 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stage99_nothing"])
