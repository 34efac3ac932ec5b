"""The model runner's part of a speculative step: where draft trees sit, and checking every draft.

A request with a draft feeds its newest token and its guesses as one chunk,
and every row of the chunk gets logits. A chain of guesses sits in order,
like any chunk. A draft tree (``eagle_topk`` above 1) does not:
``tree_layout`` gives each guess its depth in the tree as its position and
a mask that lets it see only the prefix and its own ancestors. After the
forward, ``verify_drafts`` checks the guesses against the target's logits
of their rows (``spec_verify.py`` holds the rules).
"""

import itertools

import torch

from common.device_copy import copy_to_device
from common.sampling import Sampler

from .grammar import apply_draft_masks
from .request import Request
from .spec_verify import verify, verify_tree


def verify_drafts(requests: list[Request], verifying: list[int], drafted: torch.Tensor, trees: list[int], sampler: Sampler,
                  device: torch.device):
    """Check each verifying request's guesses against the target's logits of their rows
    (``drafted``). Trees are checked on the host, one request at a time; chains as one batch.
    Returns the chain requests, their ``(tokens, accepted)`` on the device, and each tree's tokens
    and kept guesses on the chain."""
    verified, tree_tokens, in_place = None, {}, {}
    drafts = [requests[i].draft for i in verifying]
    apply_draft_masks(drafted, [requests[i].grammar for i in verifying], drafts)
    if trees:
        offsets = list(itertools.accumulate([0] + [len(d) + 1 for d in drafts]))
        for k, i in enumerate(verifying):
            if i in trees:
                tree_tokens[i], in_place[i] = verify_tree(drafted[offsets[k] : offsets[k + 1]], drafts[k],
                                                          requests[i].draft_parents, requests[i].sampling, sampler)
        chains = [k for k, i in enumerate(verifying) if i not in trees]
        (chain_rows,) = copy_to_device([[r for k in chains for r in range(offsets[k], offsets[k + 1])]], device)
        verifying, drafts, drafted = [verifying[k] for k in chains], [drafts[k] for k in chains], drafted[chain_rows]
    if verifying:
        verified = verify(drafted, drafts, [requests[i].sampling for i in verifying], sampler)
    return verifying, verified, tree_tokens, in_place


def tree_layout(requests: list[Request], new_lengths: list[int], seq_lens: list[int], trees: list[int],
                positions: list[int], device: torch.device) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Where a draft tree's guesses sit. Their K/V take the chunk's slots in order, but each
    guess's position (for RoPE) is its depth in the tree, and it sees the prefix, the newest
    token and its own ancestors only. Returns the positions for RoPE and, per tree, its mask
    ``[new tokens, keys]``."""
    rope, masks, ends = list(positions), {}, list(itertools.accumulate(new_lengths))
    for i in trees:
        parents, first, start = requests[i].draft_parents, ends[i] - new_lengths[i], seq_lens[i] - new_lengths[i]
        mask = torch.zeros(new_lengths[i], seq_lens[i], dtype=torch.bool)
        mask[:, : start + 1] = True  # the prefix and the newest token
        for j, parent in enumerate(parents):
            mask[j + 1, start + 1 + j] = True  # itself
            mask[j + 1] |= mask[parent + 1] if parent >= 0 else mask[0]  # what its parent sees
            rope[first + 1 + j] = rope[first + 1 + parent] + 1 if parent >= 0 else start + 1
        masks[i] = mask.to(device)
    (rope_positions,) = copy_to_device([rope], device)
    return rope_positions, masks
