# %% [markdown]
# # Stage 12: a page table read as runs
#
# Stages 02-11 copy every sequence's keys out of their pages before attention. Stage 12 reads
# them where they lie: each run of consecutive pages is one sequence of the attention kernel, and
# the runs' partial results are merged with their log-sum-exps. Here we serve a few requests on
# the built-in model, print their page tables as runs, and check the merge by hand on a tiny
# example. Run it with `python docs/walkthroughs/12_page_runs.py`.

# %%
import torch

from stage12_inplace_attention import Engine
from stage12_inplace_attention.page_runs import token_runs

engine = Engine(page_size=16)
runner = engine.runner
story = ("Once upon a time, in a library where every book was cut into "
         "pages of sixteen words, a librarian kept a table of where each page "
         "lay on the shelves.")
for prompt in [story, "Write a haiku about paging:", "1, 2, 3, 4, 5,"]:
    engine.add_request(prompt, max_tokens=40, temperature=0, ignore_eos=True)
for _ in range(30):  # prefill, then decode: a new page every 16 tokens
    engine.step()

# %% [markdown]
# ## Each request's pages, and the runs they make
# The allocator continued each request's last run while the page after it was free, and started
# each new request in the middle of the largest free stretch of the pool, so the runs stay whole.

# %%
for request in engine.scheduler.running:
    runs = runner.page_tables.runs[request.table_row]
    ranges = token_runs(runs, request.seq_len, runner.page_size)
    print(f"request {request.id}: {request.seq_len} tokens, pages {request.page_table}")
    print(f"  runs [first page, pages]: {runs}")
    print(f"  pool slots (start, tokens): {ranges}")

# %% [markdown]
# A new request that starts with the first one's prompt reuses its cached pages (the radix
# cache), then grows its own: two runs, the shared prefix and its own tail.

# %%
engine.add_request(story + " One day the librarian", max_tokens=20,
                   temperature=0, ignore_eos=True)
for _ in range(3):
    engine.step()
newest = max(engine.scheduler.running, key=lambda r: r.id)
print("cached tokens:", newest.cached_tokens)
print("runs:", runner.page_tables.runs[newest.table_row])

# %% [markdown]
# ## The merge, by hand
# One query against 10 keys, split into runs of 4 and 6 keys. Softmax attention over each run
# alone gives an output and a log-sum-exp of its scores; weighting each run's output by
# `exp(lse_run - lse_all)` gives exactly the attention over all 10 keys.

# %%
gen = torch.Generator().manual_seed(0)
q = torch.randn(8, generator=gen)
keys, values = torch.randn(2, 10, 8, generator=gen)
scores = keys @ q / 8**0.5
whole = scores.softmax(0) @ values

parts = []
for run in (slice(0, 4), slice(4, 10)):
    s = scores[run]
    parts.append((s.softmax(0) @ values[run], s.logsumexp(0)))
lse_all = torch.stack([lse for _, lse in parts]).logsumexp(0)
merged = sum(torch.exp(lse - lse_all) * out for out, lse in parts)
weights = [torch.exp(lse - lse_all).item() for _, lse in parts]
print("weights of the two runs:", [round(w, 3) for w in weights])
print("largest difference from attention over all keys:",
      (merged - whole).abs().max().item())

# %% [markdown]
# The weights are each run's share of the softmax's denominator, so they sum to 1. On the GPU one
# flash call computes every run's output and log-sum-exp at once (`RunAttention`), reading each
# run's keys straight from the pool.

# %%
engine.shutdown()
