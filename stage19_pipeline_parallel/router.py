"""Which data-parallel replica serves a request (``--load-balance-method``).

With ``--dp-size N`` the server runs N engine replicas, each a whole engine
with its own KV pool and prefix cache. Every request goes to one of them:

* ``round_robin``: in turn. Even, blind to the cache.
* ``shortest_queue``: the replica with the fewest unfinished requests.
* ``cache_aware`` (the default, as SGLang's router): keep, per replica, an
  approximate tree of the prompts it was sent; send a request where the
  longest prefix of it went before, so the replica's prefix cache holds
  it. When the loads grow too uneven, balance instead: the shortest queue
  wins. When no replica matches enough of the prompt, the replica that has
  been sent the fewest tokens takes it (the most room left in its cache).

The tree is approximate: it remembers what was sent, not what the replica
still caches (it may have evicted it), and it forgets its least recently
used prompts past a size limit. A wrong guess costs a recomputed prefix,
never a wrong answer.
"""

import heapq
import itertools

LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "cache_aware")
CACHE_THRESHOLD = 0.5  # route by cache when the best replica holds at least this fraction of the prompt
BALANCE_ABS_THRESHOLD = 32  # balance by load once the busiest replica has this many more requests...
BALANCE_REL_THRESHOLD = 1.5  # ...and this many times the idlest one's
MAX_TREE_TOKENS = 1 << 20  # tokens a replica's tree remembers before it forgets the least recently used


class PromptNode:
    __slots__ = ("children", "last_use", "parent", "token")

    def __init__(self, parent: "PromptNode | None", token: int | None, last_use: int):
        self.children: dict[int, PromptNode] = {}
        self.parent, self.token, self.last_use = parent, token, last_use


class PromptTree:
    """A token trie of the prompts sent to one replica, forgetting its least recently used
    prompts (leaf first) once it holds more than ``max_tokens`` tokens."""

    def __init__(self, max_tokens: int = MAX_TREE_TOKENS):
        self.root = PromptNode(None, None, 0)
        self.size, self.max_tokens = 0, max_tokens
        self._clock = itertools.count(1)

    def match(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` were sent here before."""
        node, n = self.root, 0
        for token in tokens:
            node = node.children.get(token)
            if node is None:
                break
            n += 1
        return n

    def insert(self, tokens: list[int]) -> None:
        now, node = next(self._clock), self.root
        for token in tokens:
            if token not in node.children:
                node.children[token] = PromptNode(node, token, now)
                self.size += 1
            node = node.children[token]
            node.last_use = now
        if self.size > self.max_tokens:
            self._forget(self.size - self.max_tokens * 9 // 10)  # to 90%: forgetting is rare, not every insert

    def _forget(self, count: int) -> None:
        """Drop ``count`` nodes, least recently used leaves first (a parent left bare is a leaf next)."""
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack += node.children.values()
            if not node.children and node is not self.root:
                leaves.append((node.last_use, id(node), node))
        heapq.heapify(leaves)
        while count > 0 and leaves:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.token]
            self.size -= 1
            count -= 1
            if not parent.children and parent is not self.root:
                heapq.heappush(leaves, (parent.last_use, id(parent), parent))


class Router:
    """Picks a replica for each request and keeps the counts the choice depends on."""

    def __init__(self, replicas: int, method: str = "cache_aware"):
        if method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"load_balance_method={method!r} is not one of {list(LOAD_BALANCE_METHODS)}")
        self.method, self.alive = method, [True] * replicas
        self.load = [0] * replicas  # unfinished requests routed to each replica
        self.trees = [PromptTree() for _ in range(replicas)]
        self._turn = itertools.count()

    def choose(self, prompt: list[int]) -> int:
        """The replica for a request with this prompt (its load is counted from now on)."""
        live = [r for r, up in enumerate(self.alive) if up]
        if not live:
            raise RuntimeError("no replica is alive")
        if self.method == "round_robin":
            replica = live[next(self._turn) % len(live)]
        elif self.method == "shortest_queue":
            replica = min(live, key=lambda r: self.load[r])
        else:
            replica = self._cache_aware(prompt, live)
        self.trees[replica].insert(prompt)
        self.load[replica] += 1
        return replica

    def _cache_aware(self, prompt: list[int], live: list[int]) -> int:
        busiest, idlest = max(self.load[r] for r in live), min(self.load[r] for r in live)
        if busiest - idlest > BALANCE_ABS_THRESHOLD and busiest > idlest * BALANCE_REL_THRESHOLD:
            return min(live, key=lambda r: self.load[r])
        matched = {r: self.trees[r].match(prompt) for r in live}
        best = max(live, key=lambda r: (matched[r], -self.load[r]))
        if matched[best] >= CACHE_THRESHOLD * len(prompt):
            return best
        return min(live, key=lambda r: (self.trees[r].size, self.load[r]))

    def finished(self, replica: int) -> None:
        self.load[replica] -= 1

    def replica_down(self, replica: int) -> None:
        """Route nothing more to a replica that died or hangs."""
        self.alive[replica] = False

    def replica_up(self, replica: int) -> None:
        """A restarted replica serves again, its prefix cache empty."""
        self.alive[replica], self.trees[replica] = True, PromptTree()
