"""Command line: list, start and check exercises (see ``exercises/__init__.py``)."""

import argparse
import sys

from .catalog import EXERCISES, exercises_of, find
from .workspace import ROOT, check, start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exercises", description=__doc__)
    parser.add_argument("words", nargs="*", help="STAGE | start STAGE N | check STAGE N")
    words = parser.parse_args(argv).words
    try:
        if not words:
            stages = sorted({e.stage for e in EXERCISES})
            for stage in stages:
                print(f"{stage}: {len(exercises_of(stage))} exercises")
            print("python -m exercises STAGE lists them")
        elif len(words) == 1:
            if not exercises_of(words[0]):
                parser.error(f"no exercises for {words[0]!r}; run `python -m exercises` for the list")
            for e in exercises_of(words[0]):
                print(f"{e.number}. [{e.kind}] {e.title}\n   {e.task}\n")
            print(f"python -m exercises start {words[0]} N   makes the scratch copy")
        elif len(words) == 3 and words[0] in ("start", "check"):
            exercise = find(words[1], int(words[2]))
            if words[0] == "start":
                target = start(exercise)
                print(f"[{exercise.kind}] {exercise.title}\n{exercise.task}\n")
                print(f"the file: {target.relative_to(ROOT)}")
                print(f"when done: python -m exercises check {exercise.stage} {exercise.number}")
            else:
                result = check(exercise, quiet=False)
                print("solved" if result.returncode == 0 else "not yet: the tests above say what is wrong")
                return result.returncode
        else:
            parser.error("expected: nothing, STAGE, start STAGE N, or check STAGE N")
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
