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

Which waiting requests are considered first is the schedule policy's call
(``schedule_policy.py``). Two rules sit on top of any policy:

* **in-batch prefix sharing**: a request whose prompt shares at least
  ``IN_BATCH_PREFIX_TOKENS`` uncached tokens with one admitted in the same
  step waits a step, so it reuses that prefix from the cache instead of
  computing it a second time;
* **no starvation**: a request that has waited ``STARVATION_STEPS`` steps
  goes to the front, ahead of any policy, and is never deferred.

Stage 14: a decode row with a draft feeds its newest token and its guesses.

Stage 19: with micro-batches in flight down a pipeline, the requests of
those (``busy``) sit out the next one, and the running set is split among
``depth`` micro-batches.

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
from .schedule_policy import SchedulePolicy

INIT_NEW_TOKEN_RATIO = 0.7  # share of the remaining max_tokens that admission promises pages for
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001  # per decode step without trouble, promise a little less
IN_BATCH_PREFIX_TOKENS = 32  # shared uncached tokens that make a request wait for its twin
STARVATION_STEPS = 512  # steps a request may wait before it jumps every policy


class Scheduler:
    """Holds the waiting queue and the running set and forms each step's batch."""

    def __init__(self, runner: ModelRunner, max_prefill_tokens: int, chunked_prefill_size: int | None, policy: SchedulePolicy):
        self.runner = runner
        self.policy = policy
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked_prefill_size = None if chunked_prefill_size == -1 else chunked_prefill_size  # -1: SGLang's "off"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_retractions = 0
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def next_batch(self, busy: set[int] = frozenset(), depth: int = 1,
                   max_decodes: int | None = None) -> tuple[list[Request], list[int]]:
        """The requests of the next forward step and how many new tokens each feeds. Stage 19:
        none of the ``busy`` requests (ids), and about 1/``depth`` of the running set's decodes
        (at most ``max_decodes``: ``--pp-max-micro-batch-size``)."""
        self._order_waiting()
        free = [r for r in self.running if r.id not in busy]
        if self.chunked_prefill_size is None:
            prefill = self._admit_prefill(self.max_prefill_tokens, whole_prompts=True)
            if prefill:
                return self._fit([(r, r.seq_len - r.num_cached) for r in prefill], busy)
            work = [(r, 1 + len(r.draft)) for r in free if not r.out_of_tokens][: self._share(depth, max_decodes)]
        else:
            # Decode first (one token each), then the half-done prompt, then new prompts. A request
            # whose pending token ends it by length runs no more; one that a stop token or string
            # will end may still run once more (its host has not seen the token): that extra token
            # is dropped.
            decode = [(r, 1 + len(r.draft)) for r in free
                      if r.num_cached == r.seq_len - 1 and r.num_generated and not r.out_of_tokens][: self._share(depth, max_decodes)]
            partial = [r for r in free if r.num_cached < r.seq_len - 1 or not r.num_generated]
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
        if any(n == 1 + len(r.draft) and r.num_generated for r, n in work):
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return self._fit(work, busy)

    def _share(self, depth: int, cap: int | None = None) -> int:
        """Stage 19: decodes per micro-batch, so that ``depth`` micro-batches split the running set
        (and none runs more than ``cap``)."""
        share = -(-len(self.running) // depth) if depth > 1 else len(self.running)
        return share if cap is None else min(share, cap)

    def _order_waiting(self) -> None:
        """Starving requests first (in arrival order), then the policy's order."""
        for request in self.waiting:
            request.waiting_steps += 1
        starving = [r for r in self.waiting if r.waiting_steps >= STARVATION_STEPS]
        rest = [r for r in self.waiting if r.waiting_steps < STARVATION_STEPS]
        self.waiting = deque(starving + self.policy.order(rest))

    def _admit_prefill(self, budget: int, whole_prompts: bool) -> list[Request]:
        """Admit waiting requests, in policy order, while the token budget and the pool allow.

        With ``whole_prompts`` a request must fit the budget whole (but the
        first one always goes); otherwise the last one may start a chunk.
        Requests deferred for in-batch prefix sharing, or because their LoRA
        adapter has no slot free, keep their place.
        """
        admitted, deferred = [], []
        while self.waiting and budget > 0:
            request = self.waiting[0]
            cached = self.runner.peek_cached_length(request)
            if self._twin_admitted(request, cached, admitted):
                deferred.append(self.waiting.popleft())
                continue
            if whole_prompts and admitted and request.seq_len - cached > budget:
                break
            if not self.runner.adapter_fits(request, self.running + admitted):
                # Stage 15: its adapter needs a slot the running adapters fill. Others may go first,
                # unless it is starving: then nobody is admitted until the running set makes room.
                if request.waiting_steps >= STARVATION_STEPS:
                    break
                deferred.append(self.waiting.popleft())
                continue
            if not self.runner.admit(request, self.running + admitted, self.new_token_ratio):
                break  # in order: nobody overtakes the head of the queue
            admitted.append(self.waiting.popleft())
            budget -= request.seq_len - request.num_cached
        self.waiting.extendleft(reversed(deferred))
        self.running += admitted
        for request in admitted:
            request.waiting_steps = 0
        return admitted

    @staticmethod
    def _twin_admitted(request: Request, cached: int, admitted: list[Request]) -> bool:
        """Does an admitted request share a long uncached prefix with this one (and may it wait)?
        Stage 15: only under the same adapter; K/V of another adapter is no use to it."""
        if request.waiting_steps >= STARVATION_STEPS:
            return False
        for other in admitted:
            if other.lora_path != request.lora_path:
                continue
            shared = 0
            for a, b in zip(request.all_ids, other.all_ids):
                if a != b:
                    break
                shared += 1
            if shared - cached >= IN_BATCH_PREFIX_TOKENS:
                return True
        return False

    def _fit(self, work: list[tuple[Request, int]], busy: set[int] = frozenset()) -> tuple[list[Request], list[int]]:
        """Retract the least-advanced requests until the step's new pages fit in the pool (stage 19:
        never one in flight: a rank may still be writing its K/V)."""
        while work and self.runner.pages_needed(*self._unzip(work)) > self.runner.available_pages():
            # Least progress first: fewest generated tokens, then the longest prompt (cheapest to redo last).
            victim = min((r for r in self.running if r.id not in busy),
                         key=lambda r: (len(r.output_ids), -len(r.prompt_ids)))
            self.running.remove(victim)
            self.runner.free_cache(victim)
            victim.num_cached, victim.draft = 0, []
            self.waiting.appendleft(victim)
            self.num_retractions += 1
            self.new_token_ratio = INIT_NEW_TOKEN_RATIO
            work = [(r, n) for r, n in work if r is not victim]
        return self._unzip(work)

    @staticmethod
    def _unzip(work: list[tuple[Request, int]]) -> tuple[list[Request], list[int]]:
        return [r for r, _ in work], [n for _, n in work]

    def retire_finished(self) -> list[Request]:
        """Drop finished requests from the running set and release their pages.

        A request retracted while its last token was pending can finish on
        that token in the waiting queue (it holds no pages there): it leaves too.
        """
        finished = [r for r in self.running if r.finished]
        for request in finished:
            self.runner.free_cache(request)
        self.running = [r for r in self.running if not r.finished]
        if any(r.finished for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.finished)
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
