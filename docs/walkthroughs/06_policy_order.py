# %% [markdown]
# # Stage 06: the order each policy picks
#
# When more requests wait than can start, the *schedule policy* decides who goes first. Here the
# prefix cache already holds two "documents": a long one (A) and a short one (B). Six requests
# then wait: three ask about A, two about B, one shares nothing. Run it with
# `python docs/walkthroughs/06_policy_order.py`.

# %%
from common.sampling import SamplingParams
from stage06_scheduling import Engine
from stage06_scheduling.schedule_policy import POLICIES, SchedulePolicy

engine = Engine(page_size=4)
doc_a = ("Document A. The river runs north past the mill, the church and the old stone bridge, "
         "then west through the fields to the sea, where the fishing boats wait for the tide. ")
doc_b = "Document B. Bread needs flour, water and salt. "
engine.generate_batch([doc_a + "Summary:", doc_b + "Summary:"], max_tokens=1, temperature=0)  # warm the cache

questions = [("none", "Tell me a joke.", 4), ("A", doc_a + "Where does the river run?", 2),
             ("B", doc_b + "What does bread need?", 8), ("A", doc_a + "What is past the mill?", 6),
             ("B", doc_b + "How hot is the oven?", 3), ("A", doc_a + "Name the bridge.", 5)]
for label, text, max_tokens in questions:
    engine.add_request(text, max_tokens=max_tokens, temperature=0, ignore_eos=True)
waiting = list(engine.scheduler.waiting)
labels = {r.id: f"{label}{r.id}(max {m})" for r, (label, _, m) in zip(waiting, questions)}
cache = engine.runner.radix_cache
for r in waiting:
    print(f"{labels[r.id]:<12} {len(cache.match_prefix(r.all_ids[:-1])[0]) * 4:3d} prompt tokens cached")

# %% [markdown]
# ## Each policy's order
# The same six requests, ordered by every policy (`SchedulePolicy.order`, what the scheduler
# calls before admitting):

# %%
for name in POLICIES:
    order = SchedulePolicy(name, cache, seed=0).order(waiting)
    print(f"{name:<11}", " ".join(labels[r.id] for r in order))

# %% [markdown]
# * `fcfs` keeps arrival order.
# * `lpm` (longest prefix match) puts the requests with the most cached tokens first.
# * `dfs-weight` walks the tree from the root, where the request that matched nothing sits, and
#   then serves the subtree with the most waiting requests first (A's three, then B's two), so
#   requests sharing a prefix run back to back while it is cached.
# * `lof` (longest output first) sorts by `max_tokens`; `random` shuffles (seeded).
#
# ## Order changes, tokens do not
# Run the queue to the end under fcfs (this engine's default), then the same requests on an
# engine using `lpm`: greedy tokens are the same under any policy.

# %%
while engine.scheduler.waiting or engine.scheduler.running:
    engine.step()
fcfs_tokens = [engine.get_output(r.id).token_ids for r in waiting]
with Engine(page_size=4, schedule_policy="lpm") as lpm_engine:
    lpm_engine.generate_batch([doc_a + "Summary:", doc_b + "Summary:"], max_tokens=1, temperature=0)
    outputs = lpm_engine.generate_batch([q for _, q, _ in questions],
                                        [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, _, m in questions])
print([len(t) for t in fcfs_tokens], "tokens each; same under lpm:", [o.token_ids for o in outputs] == fcfs_tokens)
