"""The scheduler: which requests run in the next forward step.

Requests wait in a queue and join or leave the running set at every step
(continuous batching). Each step is one of two kinds:

* **prefill**: waiting requests, admitted in arrival order while their new
  tokens fit ``max_prefill_tokens`` and the KV pool can promise them pages;
* **decode**: every running request, one new token each.

Prefill goes first whenever someone can be admitted, so new requests start
quickly (as in SGLang). Admission promises pages for only part of each
request's remaining ``max_tokens`` (``new_token_ratio``), because many stop
early; when decode then finds the pool short, the requests with the least
progress are *retracted*: their KV pages are released (whole pages into the
prefix cache) and they go back to the front of the queue with their tokens,
to be recomputed later.
"""

from collections import deque

from .model_runner import ModelRunner
from .request import Request

INIT_NEW_TOKEN_RATIO = 0.7  # share of the remaining max_tokens that admission promises pages for
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001  # per decode step without trouble, promise a little less


class Scheduler:
    """Holds the waiting queue and the running set and forms each step's batch."""

    def __init__(self, runner: ModelRunner, max_prefill_tokens: int):
        self.runner = runner
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_retractions = 0
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def next_batch(self) -> list[Request]:
        """The requests of the next forward step: a prefill batch if any can start, else a decode batch."""
        prefill = self._admit_prefill()
        if prefill:
            self.running += prefill
            return prefill
        if self.running:
            self._retract_until_decode_fits()
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return list(self.running)

    def _admit_prefill(self) -> list[Request]:
        """Waiting requests, in order, while the token budget and the pool allow (at least one if it fits)."""
        admitted, budget = [], self.max_prefill_tokens
        while self.waiting:
            request = self.waiting[0]
            new_tokens = request.seq_len - self.runner.peek_cached_length(request)
            if admitted and new_tokens > budget:
                break
            if not self.runner.admit(request, self.running + admitted, self.new_token_ratio):
                break  # in order: nobody overtakes the head of the queue
            admitted.append(self.waiting.popleft())
            budget -= request.seq_len - request.num_cached
        return admitted

    def _retract_until_decode_fits(self) -> None:
        """Retract the least-advanced requests until every running one can get its next page."""
        while self.runner.decode_pages_needed(self.running) > self.runner.available_pages():
            # Least progress first: fewest generated tokens, then the longest prompt (cheapest to redo last).
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.prompt_ids)))
            self.running.remove(victim)
            self.runner.free_cache(victim)
            victim.num_cached = 0
            self.waiting.appendleft(victim)
            self.num_retractions += 1
            self.new_token_ratio = INIT_NEW_TOKEN_RATIO

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
