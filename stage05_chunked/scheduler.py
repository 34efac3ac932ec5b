"""The scheduler: which requests run in the next forward step, and how many tokens each feeds.

Requests wait in a queue and join or leave the running set at every step
(continuous batching). With chunked prefill, one step carries both kinds of
work in a single forward:

* **decode**: every running request whose prompt is done, one token each;
* **prefill chunks**: up to ``chunked_prefill_size`` prompt tokens, first
  from the request whose prompt is half done, then from newly admitted ones.
  A prompt longer than what is left of that budget is cut: the request keeps
  its place (and its pages) and continues with the next chunk next step.

So a long prompt no longer stalls everyone's decode, and no forward holds
activations for more than a chunk of prompt tokens. Without chunking
(``chunked_prefill_size`` -1), a step is a prefill batch bounded by
``max_prefill_tokens`` or a decode batch, as in stage 04.

Admission promises pages for only part of each request's remaining
``max_tokens`` (``new_token_ratio``), because many stop early; when a step
then finds the pool short, the requests with the least progress are
*retracted*: their KV pages are released (whole pages into the prefix cache)
and they go back to the front of the queue with their tokens, to be
recomputed later.
"""

from collections import deque

from .model_runner import ModelRunner
from .request import Request

INIT_NEW_TOKEN_RATIO = 0.7  # share of the remaining max_tokens that admission promises pages for
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001  # per decode step without trouble, promise a little less


class Scheduler:
    """Holds the waiting queue and the running set and forms each step's batch."""

    def __init__(self, runner: ModelRunner, max_prefill_tokens: int, chunked_prefill_size: int | None):
        self.runner = runner
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked_prefill_size = None if chunked_prefill_size == -1 else chunked_prefill_size  # -1: SGLang's "off"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_retractions = 0
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def next_batch(self) -> tuple[list[Request], list[int]]:
        """The requests of the next forward step and how many new tokens each feeds."""
        if self.chunked_prefill_size is None:
            prefill = self._admit_prefill(self.max_prefill_tokens, whole_prompts=True)
            if prefill:
                return self._fit([(r, r.seq_len - r.num_cached) for r in prefill])
            work = [(r, 1) for r in self.running]
        else:
            # Decode first (one token each), then the half-done prompt, then new prompts.
            decode = [(r, 1) for r in self.running if r.num_cached == r.seq_len - 1 and r.output_ids]
            partial = [r for r in self.running if r.num_cached < r.seq_len - 1 or not r.output_ids]
            budget, chunks = self.chunked_prefill_size, []
            for request in partial:
                n = min(request.seq_len - request.num_cached, budget)
                if n > 0:
                    chunks.append((request, n))
                    budget -= n
            if budget > 0 and len(chunks) == len(partial):  # only when no prompt is left half done
                for request in self._admit_prefill(budget, whole_prompts=False):
                    n = min(request.seq_len - request.num_cached, budget)
                    chunks.append((request, n))
                    budget -= n
            work = decode + chunks
        if any(n == 1 and r.output_ids for r, n in work):
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return self._fit(work)

    def _admit_prefill(self, budget: int, whole_prompts: bool) -> list[Request]:
        """Admit waiting requests, in order, while the token budget and the pool allow.

        With ``whole_prompts`` a request must fit the budget whole (but the
        first one always goes); otherwise the last one may start a chunk.
        """
        admitted = []
        while self.waiting and budget > 0:
            request = self.waiting[0]
            new_tokens = request.seq_len - self.runner.peek_cached_length(request)
            if whole_prompts and admitted and new_tokens > budget:
                break
            if not self.runner.admit(request, self.running + admitted, self.new_token_ratio):
                break  # in order: nobody overtakes the head of the queue
            admitted.append(self.waiting.popleft())
            budget -= request.seq_len - request.num_cached
        self.running += admitted
        return admitted

    def _fit(self, work: list[tuple[Request, int]]) -> tuple[list[Request], list[int]]:
        """Retract the least-advanced requests until the step's new pages fit in the pool."""
        while work and self.runner.pages_needed(*self._unzip(work)) > self.runner.available_pages():
            # Least progress first: fewest generated tokens, then the longest prompt (cheapest to redo last).
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.prompt_ids)))
            self.running.remove(victim)
            self.runner.free_cache(victim)
            victim.num_cached = 0
            self.waiting.appendleft(victim)
            self.num_retractions += 1
            self.new_token_ratio = INIT_NEW_TOKEN_RATIO
            work = [(r, n) for r, n in work if r is not victim]
        return self._unzip(work)

    @staticmethod
    def _unzip(work: list[tuple[Request, int]]) -> tuple[list[Request], list[int]]:
        return [r for r, _ in work], [n for _, n in work]

    def retire_finished(self) -> list[Request]:
        """Drop finished requests from the running set and release their pages."""
        finished = [r for r in self.running if r.finished]
        for request in finished:
            self.runner.free_cache(request)
        self.running = [r for r in self.running if not r.finished]
        return finished

    def abort(self, request: Request) -> None:
        """Stop a request wherever it is; its pages are released."""
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
            self.runner.free_cache(request)
        if not request.finished:
            request.finish_reason = "abort"
