"""Verify drafts: one target forward scores every guess, and only what the target would have said is kept.

A request with a draft ``d_0 .. d_{k-1}`` feeds its newest token and the k
guesses in one forward (a causal chunk, like a prompt chunk). Row ``j`` of
its logits is the target model's next-token distribution ``p_j`` after the
guesses before ``d_j``, so one forward answers k + 1 questions at once.

* **greedy**: ``d_j`` is kept while it equals ``argmax p_j``; the first
  row where they differ gives the target's own token instead (and if every
  guess is kept, the last row gives one more). The output is exactly the
  target's greedy output, whatever the guesses were.
* **sampling** (rejection sampling, Leviathan et al. 2023): ``d_j`` is kept
  with probability ``p_j(d_j)``; the first rejected row draws from ``p_j``
  with ``d_j`` taken out (renormalised). A guessed token then comes out with
  probability ``p(d)`` (kept) and any other token ``x`` with
  ``(1 - p(d)) * p(x) / (1 - p(d)) = p(x)``: exactly ``p``. The drafts here
  are deterministic (n-gram lookups, a draft model's argmax), so the general
  rule ``min(1, p/q)`` with ``q`` a point mass reduces to this one.

Each verified request thus gains between 1 and k + 1 tokens for one target
forward. ``p_j`` is the distribution the sampler would draw from:
temperature, then top-k / top-p / min-p, after the grammar's mask.
"""

import torch

from common.device_copy import copy_to_device
from common.sampling import RowFilters, Sampler, SamplingState, exponential_, filter_probabilities


def verify(logits: torch.Tensor, drafts: list[list[int]], states: list[SamplingState], sampler: Sampler):
    """``logits [sum(k_s + 1), vocab]``: each request's rows in order, its newest token's row first.

    Returns ``tokens [S, K + 1]`` and ``accepted [S]`` on the device: request
    ``s`` keeps ``tokens[s, :accepted[s] + 1]`` (its accepted guesses, then the
    target's own next token).
    """
    lengths = [len(d) for d in drafts]
    widest = max(lengths)
    starts = [sum(lengths[:s]) + s for s in range(len(drafts))]
    sampled = [s for s, state in enumerate(states) if not state.params.greedy]
    # A request's rows past its own draft repeat its last row; its missing guesses are -1 (never kept).
    (rows, padded, sampled_rows) = copy_to_device(
        [[start + min(j, k) for start, k in zip(starts, lengths) for j in range(widest + 1)],
         [t for d in drafts for t in d + [-1] * (widest + 1 - len(d))], sampled],
        logits.device)
    logits = logits[rows].view(len(drafts), widest + 1, -1)
    draft = padded.view(len(drafts), widest + 1)  # one column more than the guesses: -1, the "no guess" after the last
    target = logits.argmax(dim=-1)  # [S, K + 1]
    kept = target[:, :widest] == draft[:, :widest]  # the greedy rule
    probs = None
    if sampled:
        probs = target_probabilities(logits[sampled_rows], [states[s].params for s in sampled])  # [S', K + 1, vocab]
        guess = draft[sampled_rows, :widest]
        chance = torch.stack([uniform(widest, states[s], sampler, logits.device) for s in sampled])
        kept[sampled_rows] = kept_by_chance(probs[:, :widest], guess.clamp(min=0), chance) & (guess >= 0)
    accepted = kept.int().cumprod(dim=1).sum(dim=1)  # leading guesses kept
    # The token after them: the target's argmax, or for sampled rows a draw from p without the rejected guess.
    final = target.gather(1, accepted[:, None])[:, 0]
    if sampled:
        at = accepted[sampled_rows]
        p = probs[torch.arange(len(sampled), device=logits.device), at]  # [S', vocab]
        rejected = draft[sampled_rows].gather(1, at[:, None])  # -1 where every guess was kept
        p = p.scatter(1, rejected.clamp(min=0), p.gather(1, rejected.clamp(min=0)) * (rejected < 0))  # zero the guess
        p = p / p.sum(dim=1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
        final[sampled_rows] = draw(p, [states[s] for s in sampled], sampler)
    tokens = draft.clone().scatter_(1, accepted[:, None], final[:, None])
    return tokens, accepted


def kept_by_chance(probs: torch.Tensor, guess: torch.Tensor, chance: torch.Tensor) -> torch.Tensor:
    """The rejection rule: a guess is kept with its probability under the target (``chance`` ~ U[0, 1))."""
    return chance < probs.gather(-1, guess[..., None])[..., 0]


def target_probabilities(logits: torch.Tensor, params: list) -> torch.Tensor:
    """``logits [S, rows, vocab]`` -> the distribution the sampler draws from at every row:
    temperature, then the request's top-k / top-p / min-p filters."""
    count, per, vocab = logits.shape
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p_rows = [s * per + j for s, p in enumerate(params) if p.top_p < 1.0 for j in range(per)]
    (values, top_p_index) = copy_to_device(
        [[v for p, k in zip(params, top_k) for v in (p.temperature, k, p.top_p, p.min_p) for _ in range(per)], top_p_rows],
        logits.device, dtype=torch.float32)
    temperature, k, top_p, min_p = values.view(count, 4, per).transpose(0, 1).reshape(4, count * per)
    filters = RowFilters(k.long(), top_p, min_p, max(top_k), any(p.min_p > 0 for p in params),
                         top_p_index.long() if top_p_rows else None)
    probs = torch.softmax(logits.reshape(count * per, vocab) / temperature[:, None], dim=-1)
    return filter_probabilities(probs, filters).view(count, per, vocab)


def uniform(count: int, state: SamplingState, sampler: Sampler, device: torch.device) -> torch.Tensor:
    """``count`` draws from U[0, 1), from the request's own generator when it has a seed."""
    generator = state.generator if state.generator is not None else sampler.shared_generator
    return torch.rand(count, generator=generator, device=device)


def draw(probs: torch.Tensor, states: list[SamplingState], sampler: Sampler) -> torch.Tensor:
    """One token per row of ``probs`` (the exponential race, as the sampler draws)."""
    noise = torch.empty_like(probs)
    for row, state in enumerate(states):
        exponential_(noise[row], state.generator if state.generator is not None else sampler.shared_generator)
    return (probs / noise).argmax(dim=-1)


def verify_tree(logits: torch.Tensor, guesses: list[int], parents: list[int], state: SamplingState,
                sampler: Sampler) -> tuple[list[int], int]:
    """One request's draft tree: ``logits [1 + len(guesses), vocab]``, row 0 the newest token's, row
    ``i + 1`` guess ``i``'s; ``parents[i]`` is the guess that guess ``i`` follows (-1: the newest
    token). Children are tried in order, the chain's first.

    Walks down from the newest token: greedy keeps the child that is the row's argmax; sampling
    tries each child with the rule above, taking each rejected one out of ``p`` before the next
    (exact for any number of deterministic candidates: each try is one candidate against what
    is left of ``p``). Returns the tokens gained (kept guesses, then one drawn at the node where
    the walk stopped) and the kept guesses that lie on the chain (their K/V is in place).
    """
    children = [[] for _ in range(len(guesses) + 1)]  # row -> the guesses that follow it
    for i, parent in enumerate(parents):
        children[parent + 1].append(i)
    params = state.params
    probs = None if params.greedy else target_probabilities(logits[None], [params])[0]
    row, gained, in_place, on_chain = 0, [], 0, True
    while True:
        if probs is None:
            best = int(logits[row].argmax())
            kept = next((i for i in children[row] if guesses[i] == best), None)
        else:
            p, kept = probs[row].clone(), None
            for i in children[row]:
                if guesses[i] < 0:
                    continue
                if kept_by_chance(p, torch.tensor(guesses[i], device=p.device), uniform(1, state, sampler, p.device)[0]):
                    kept = i
                    break
                p[guesses[i]] = 0.0
                p = p / p.sum().clamp(min=torch.finfo(p.dtype).tiny)
            best = None if kept is not None else int(draw(p[None], [state], sampler)[0])
        if kept is None:
            return gained + [best], in_place
        gained.append(guesses[kept])
        on_chain = on_chain and kept == row  # the chain's guess j follows row j
        in_place += on_chain
        row = kept + 1
