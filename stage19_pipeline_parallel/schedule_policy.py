"""Scheduling policies: in which order waiting requests are considered for admission.

Cache-aware policies look at the radix tree:

* ``lpm`` (longest prefix match): requests with the most tokens already
  cached go first, so the cache is used while it still holds their prefix.
* ``dfs-weight``: walk the tree depth first, taking at each node the child
  subtree with the most waiting requests first, so requests that share a
  subtree run together and their common prefix stays hot.

Cache-agnostic policies:

* ``fcfs``: first come, first served (retracted requests come back first).
* ``lof`` (longest output first): the largest ``max_tokens`` first.
* ``random``: a shuffled order (seeded, so runs repeat).

Sorting by prefix costs a tree walk per request, so with a very long queue
the cache-aware policies fall back to fcfs (as SGLang does past 128).
"""

import random
from collections import defaultdict

from .radix_cache import RadixCache, TreeNode
from .request import Request

POLICIES = ("fcfs", "lpm", "dfs-weight", "lof", "random")
CACHE_AWARE = ("lpm", "dfs-weight")
CACHE_AWARE_QUEUE_LIMIT = 128


class SchedulePolicy:
    """Orders the waiting queue by one policy."""

    def __init__(self, name: str, radix_cache: RadixCache | None, seed: int = 0):
        if name not in POLICIES:
            raise ValueError(f"schedule_policy={name!r} is not one of {', '.join(POLICIES)}")
        if name in CACHE_AWARE and radix_cache is None:
            raise ValueError(f"schedule_policy={name!r} needs the radix cache; drop --disable-radix-cache")
        self.name = name
        self.radix_cache = radix_cache
        self.rng = random.Random(seed)

    def effective_policy(self, queue_length: int) -> str:
        if self.name in CACHE_AWARE and queue_length > CACHE_AWARE_QUEUE_LIMIT:
            return "fcfs"
        return self.name

    def order(self, waiting: list[Request]) -> list[Request]:
        """The waiting requests in the order admission should consider them."""
        policy = self.effective_policy(len(waiting))
        if policy == "fcfs":
            return list(waiting)
        if policy == "lof":
            return sorted(waiting, key=lambda r: -r.params.max_tokens)  # stable: ties keep arrival order
        if policy == "random":
            shuffled = list(waiting)
            self.rng.shuffle(shuffled)
            return shuffled
        matches = {r.id: self.radix_cache.match_prefix(r.all_ids[:-1], r.lora_path) for r in waiting}
        if policy == "lpm":
            return sorted(waiting, key=lambda r: -len(matches[r.id][0]))
        return self._dfs_weight_order(waiting, {r.id: matches[r.id][1] for r in waiting})

    def _dfs_weight_order(self, waiting: list[Request], last_node: dict[int, TreeNode]) -> list[Request]:
        """Depth-first over the tree, heavier subtrees (more waiting requests) first."""
        weight: dict[int, int] = defaultdict(int)
        at_node: dict[int, list[Request]] = defaultdict(list)
        for request in waiting:
            node = last_node[request.id]
            at_node[id(node)].append(request)
            while node is not None:
                weight[id(node)] += 1
                node = node.parent
        # Stage 15: each adapter's prefixes hang from a root of their own; visit every root.
        ordered, stack = [], sorted(self.radix_cache.roots.values(), key=lambda c: weight[id(c)])
        while stack:
            node = stack.pop()
            ordered += at_node[id(node)]
            children = [c for c in node.children.values() if weight[id(c)] > 0]
            # Push lightest first so the heaviest subtree is visited next.
            stack += sorted(children, key=lambda c: weight[id(c)])
        return ordered

