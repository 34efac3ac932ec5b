"""Exercises for the course: guided changes to a scratch copy of a stage, checked by its tests.

    python -m exercises                       # the stages that have exercises
    python -m exercises stage03_radix         # that stage's exercises
    python -m exercises start stage03_radix 1 # a scratch copy with the exercise's change in it
    python -m exercises check stage03_radix 1 # run the tests that judge it: solved or not yet

Two kinds. *Break it*: the scratch copy carries a known bug; find which test
catches it and why, then fix it. *Build it*: a function body is gone from the
scratch copy; write it until the tests pass. The stage folders never change:
scratch copies live under ``exercise-work/`` and the tests are pointed at them
(``QWEN3_LADDER_SCRATCH``, read by ``tests/conftest.py``).
"""
