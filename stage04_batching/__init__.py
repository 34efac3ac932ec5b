"""Stage 04 (batching): continuous batching. Requests join a waiting queue at
any time; every step the scheduler runs either a prefill batch of newly
admitted requests (packed, ragged) or one decode step of all running
requests (attended in a single padded call), and finished requests leave
at once. Admission promises pages for part of each request's max_tokens;
when decode runs short, the least-advanced requests are retracted to the
queue and recomputed later. ``add_request`` / ``step`` / ``abort_request`` /
``get_output`` expose the loop."""

from common.sampling import SamplingParams

from .engine import Engine
from .request import GenerateOutput

__all__ = ["Engine", "GenerateOutput", "SamplingParams"]
