"""STANDALONE drafts: a smaller model with the same tokenizer guesses the next tokens.

The draft model runs in its own ``ModelRunner``: its own weights and its own
paged KV pool (as many pages as the target's, each smaller), no prefix cache.
Each request has a ``DraftSequence`` there: the tokens the draft model has
been fed and the pages that hold their K/V.

To draft ``k`` tokens for a batch, the draft model first catches up on the
tokens the request gained since its last draft (the target's last verify
kept some guesses and added a token of its own), then decodes greedily ``k``
times, the whole batch per forward. Its guesses past what the target kept
are rolled back the next time: the sequence keeps the K/V of its longest
common prefix with the request and frees the pages beyond it.

With ``topk`` above 1 each draft step also keeps the draft model's next
``topk - 1`` best tokens: alternatives to the chain's guess at that depth,
which the engine verifies as the leaves of a draft tree.

A trained EAGLE head would take the draft model's place (it reads the
target's hidden states instead of running a model of its own); the draft
worker is shaped so that it can: ``propose(requests, limits)`` in,
guesses out.
"""

import itertools

from common.sampling import SamplingParams

from .model_runner import ModelRunner

_draft_ids = itertools.count()


class DraftSequence:
    """What ``ModelRunner.launch`` reads of a request, for the draft model's copy of one."""

    def __init__(self, state, max_seq_len: int):
        self.id = -1 - next(_draft_ids)  # never a target request's id
        self.all_ids: list[int] = []
        self.sampling, self.params, self.grammar = state, state.params, None
        self.max_seq_len = max_seq_len
        self.num_cached = self.pending_tokens = 0
        self.draft: list[int] = []  # (the draft model itself is never given guesses)
        self.page_table: list[int] = []
        self.table_row, self.pages_on_device, self.prefix_node, self.shared_pages = None, 0, None, 0

    @property
    def seq_len(self) -> int:
        return len(self.all_ids) + self.pending_tokens


class DraftModelWorker:
    """Greedy guesses from a draft model for a batch of requests."""

    def __init__(self, runner: ModelRunner, context_length: int, topk: int = 1):
        self.runner, self.context_length, self.topk = runner, context_length, topk
        self.sequences: dict[int, DraftSequence] = {}  # target request id -> its draft sequence
        # Greedy; with a tree, each step's best tokens come with it (as log-probability alternatives).
        self.greedy = SamplingParams(temperature=0.0, return_logprob=topk > 1, top_logprobs_num=topk if topk > 1 else 0)
        self.alternatives: dict[int, list[list[int]]] = {}  # request id -> the latest draft's alternatives per depth

    def propose(self, requests: list, limits: list[int]) -> list[list[int]]:
        drafts = [[] for _ in requests]
        self.alternatives = {request.id: [] for request in requests}
        active = [i for i, (request, limit) in enumerate(zip(requests, limits)) if limit > 0 and self._sync(request)]
        for _ in range(max((limits[i] for i in active), default=0)):
            active = [i for i in active if len(drafts[i]) < limits[i]]
            batch = [self.sequences[requests[i].id] for i in active]
            new_lengths = [seq.seq_len - seq.num_cached for seq in batch]
            if self.runner.pages_needed(batch, new_lengths) > self.runner.allocator.num_free:
                break  # the draft pool is full: draft what there is
            for i, seq, (token,) in zip(active, batch, self.runner.launch(batch, new_lengths).tokens()):
                seq.pending_tokens -= 1
                seq.all_ids.append(token)
                drafts[i].append(token)
                if self.topk > 1:
                    _, (top,) = seq.sampling.output_logprobs(0, 1)
                    seq.sampling.logprobs.clear()
                    self.alternatives[requests[i].id].append([t for t, _ in top if t != token][: self.topk - 1])
        return drafts

    def _sync(self, request) -> bool:
        """Bring the request's draft sequence up to its tokens: keep the K/V of their common
        prefix, give back the pages past it. False when the sequence cannot get a table row."""
        seq = self.sequences.get(request.id)
        if seq is None:
            if not self.runner.page_tables.free_rows:
                return False
            seq = self.sequences[request.id] = DraftSequence(self.runner.sampler.new_state(self.greedy, []), self.context_length)
            self.runner.page_tables.take_row(seq)
        common = next((j for j, (a, b) in enumerate(zip(seq.all_ids, request.all_ids)) if a != b),
                      min(len(seq.all_ids), len(request.all_ids)))
        seq.num_cached = min(seq.num_cached, common, len(request.all_ids) - 1)  # feed at least the newest token
        self.runner.truncate_cache(seq)
        seq.all_ids = list(request.all_ids)
        return True

    def retain(self, running: list) -> None:
        """Free the draft pages and table row of every request that no longer runs."""
        keep = {r.id for r in running}
        for request_id in [i for i in self.sequences if i not in keep]:
            self.runner.free_cache(self.sequences.pop(request_id))
