"""Stage 10 (overlap): the host prepares step N+1 while the GPU runs step N.
Each step is launched before the tokens of the step before it are read: a
token not yet known on the host enters the batch as a placeholder that the
device fills in from the previous step's sampled tokens. The host then reads
step N's tokens, appends text, checks stop rules and retires requests while
the GPU computes step N+1. ``--disable-overlap-schedule`` turns it off."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
