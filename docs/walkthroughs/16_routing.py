# %% [markdown]
# # Stage 16: where each request of a shuffled prefix workload goes
#
# Sixteen prompts in four groups: each group shares a 64-token prefix (a system prompt, say), then
# each prompt has 8 tokens of its own, and the order is shuffled. Two replicas serve them. A
# replica's prefix cache can only reuse what that replica computed before, so where a request
# goes decides whether its prefix is a hit. We route the same workload with each
# `--load-balance-method` (`router.py`), one request at a time, and count the prefix tokens a
# replica had already been sent: the hits its cache would give (whole pages of 16 tokens).
# Run it with `python docs/walkthroughs/16_routing.py`.

# %%
import random

from stage16_data_parallel.router import Router

rng = random.Random(0)
prefixes = [[rng.randrange(10, 5000) for _ in range(64)] for _ in range(4)]
workload = [(g, prefixes[g] + [rng.randrange(10, 5000) for _ in range(8)])
            for g in range(4) for _ in range(4)]
rng.shuffle(workload)
print("groups in arrival order:", "".join("ABCD"[g] for g, _ in workload))

# %% [markdown]
# ## One replica, then two
# With one replica every prompt after its group's first finds the prefix. With two, it depends on
# the router: round-robin alternates blindly; cache-aware sends a prompt where its prefix went.

# %%
PAGE = 16


def route(method: str, replicas: int) -> tuple[str, float]:
    router = Router(replicas, method)
    places, hits, total = "", 0, 0
    for group, prompt in workload:
        matched = [tree.match(prompt) for tree in router.trees]
        replica = router.choose(prompt)
        hits += matched[replica] // PAGE * PAGE
        total += len(prompt)
        places += str(replica)
        router.finished(replica)  # one at a time: each finishes before the next
    return places, hits / total


for method, replicas in [("round_robin", 1), ("round_robin", 2),
                         ("shortest_queue", 2), ("cache_aware", 2)]:
    places, rate = route(method, replicas)
    print(f"{method:>14} x{replicas}: {places}  hit rate {rate:.2f}")

# %% [markdown]
# Cache-aware routing sends every group to one replica, so it keeps the single replica's hit
# rate while two replicas share the work. The first prompt of a group matches nowhere; it goes
# to the replica that has been sent the fewest tokens (the most room left in its cache), which
# spreads the groups. Shortest-queue sees equal loads (each request finished before the next)
# and so always picks the first replica here: cache-blind, and unbalanced. Under real load, when
# one replica's queue grows far past the other's, cache-aware routing balances by load instead.
