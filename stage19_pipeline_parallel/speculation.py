"""The engine's side of speculative decoding: guesses before a step, what the verify kept after it.

Before each step, ``propose`` asks the drafter for guesses of every
decoding request's next tokens (``ngram_draft.py``: the request's own
n-grams; ``draft_model.py``: a smaller model) and puts them on the request
(``request.draft``; a draft tree's shape in ``request.draft_parents``). The
step feeds them in its one target forward and verifies them
(``spec_verify.py``). After the step, ``keep_verified`` trusts the K/V of
the kept guesses only and gives the pages of the rest back to the pool.
"""

import dataclasses

from .draft_model import DraftModelWorker
from .engine_args import EngineArgs
from .model_runner import ModelRunner
from .ngram_draft import NgramDrafter
from .request import Request
from .speculative_args import speculative_guesses


def make_speculator(args: EngineArgs, runner: ModelRunner) -> "Speculator | None":
    """The speculator ``args`` ask for, drafting for ``runner`` (the target); None without
    ``speculative_algorithm``. The settings are checked either way."""
    num_guesses, topk = speculative_guesses(args), args.speculative_eagle_topk or 1
    if args.speculative_algorithm == "NGRAM":
        return Speculator(NgramDrafter(), runner, num_guesses, topk)
    if args.speculative_algorithm == "STANDALONE":  # on rank 0 only, with as many pages as the target's pool
        draft_args = dataclasses.replace(args, model_path=args.speculative_draft_model_path, kv_cache_bytes=None,
                                         disable_radix_cache=True, tp_size=1, ep_size=1, lora_paths=None,
                                         max_lora_rank=None, nnodes=1, dist_init_addr=None)
        draft = ModelRunner(draft_args, num_pages=runner.allocator.num_pages)
        if draft.config.vocab_size != runner.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the target's "
                             f"({runner.config.vocab_size}); a draft model must share the target's tokenizer")
        draft.init_cuda_graphs(progress=False)
        drafter = DraftModelWorker(draft, runner.config.max_position_embeddings, topk)
        return Speculator(drafter, runner, num_guesses, topk)
    return None


class Speculator:
    """Drafts before each step and keeps the verified guesses after it; counts what verifies gave."""

    def __init__(self, drafter, runner: ModelRunner, num_guesses: int, topk: int):
        self.drafter, self.runner = drafter, runner
        self.num_guesses, self.topk = num_guesses, topk  # guesses a verify feeds per request; a tree's width
        self.spec_verify_ct = self.spec_tokens = 0  # verify forwards per request, and the tokens they gave

    def propose(self, running: list[Request], context_length: int) -> None:
        """Guess the next tokens of every request that decodes next step; the step verifies them.

        A draft never runs past what the request may still generate (its
        max_tokens and the context, counting the target's own token after the
        guesses), and a constrained request keeps only the guesses its grammar
        allows. Requests that penalize repeats or return log-probabilities
        decode one token at a time.
        """
        ready, limits = [], []
        for request in running:
            request.draft, request.draft_parents = [], None
            if (request.num_cached == request.seq_len - 1 and request.num_generated and not request.finished
                    and not request.params.uses_penalties and not request.params.return_logprob):
                ready.append(request)
                limits.append(min(self.num_guesses, request.params.max_tokens - request.num_generated - 1,
                                  context_length - request.seq_len - 1))
        for request, draft in zip(ready, self.drafter.propose(ready, limits) if ready else []):
            request.draft = request.grammar.valid_prefix(draft) if request.grammar is not None else draft
            if self.topk > 1 and request.grammar is None and request.draft:
                self._grow_tree(request)
        # A verify replays a CUDA graph when every row has the same width: pad the drafts with
        # guesses that are never kept (-1), as long as each fits below the context.
        if (self.runner.graphs is not None and self.topk == 1 and any(r.draft for r in ready)
                and all(r.seq_len + self.num_guesses < context_length for r in ready)):
            for request in ready:
                request.draft += [-1] * (self.num_guesses - len(request.draft))

    def _grow_tree(self, request: Request) -> None:
        """Turn the request's chain of guesses into a draft tree: after the chain, each depth's
        alternatives (the draft model's next best tokens there), each following the chain's guess
        before it. A tree's guesses never overshoot: at most one token per depth is kept."""
        chain = request.draft
        alternatives = self.drafter.alternatives.get(request.id, [])[: len(chain)]
        request.draft_parents = list(range(-1, len(chain) - 1))
        for depth, tokens in enumerate(alternatives):
            request.draft = request.draft + tokens
            request.draft_parents += [depth - 1] * len(tokens)

    def keep_verified(self, request: Request, gained: int, in_place: int | None) -> None:
        """After a verify: the request's K/V is trusted up to its newest token and the guesses kept
        in place (a chain's kept guesses, ``gained - 1``; of a tree's, those on its chain). The
        pages of the rest go back to the pool. A kept alternative and the token after it are fed
        again next step, as a chunk."""
        kept = gained - 1 if in_place is None else in_place
        request.num_cached -= len(request.draft) - kept
        request.draft, request.draft_parents = [], None
        self.runner.truncate_cache(request)
        request.spec_verify_ct += 1
        request.spec_tokens += gained
        self.spec_verify_ct += 1
        self.spec_tokens += gained

    def retain(self, running: list[Request]) -> None:
        """Let the drafter forget the requests that are no longer running (and free their draft pages)."""
        self.drafter.retain(running)
