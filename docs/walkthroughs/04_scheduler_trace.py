# %% [markdown]
# # Stage 04: who joins and leaves each step
#
# Continuous batching: at every step the scheduler forms a new batch. Waiting requests join as
# soon as the token budget and the KV pool allow (a *prefill* step), finished ones leave at once,
# and everyone else decodes one token together. Here `max_prefill_tokens=12` admits only a few
# short prompts per step, and the requests want different numbers of tokens, so the running set
# changes as it goes. Run it with `python docs/walkthroughs/04_scheduler_trace.py`.

# %%
from stage04_batching import Engine

engine = Engine(max_prefill_tokens=12)
scheduler, runner = engine.scheduler, engine.runner
original_step = runner.step


def traced_step(batch):
    """Print one line per forward step: its kind, who is in it, who is still waiting."""
    kind = "prefill" if all(r.num_cached == 0 for r in batch) else "decode "
    tokens = original_step(batch)
    print(f"{kind}  batch {sorted(r.id for r in batch)}  waiting {[r.id for r in scheduler.waiting]}")
    return tokens


runner.step = traced_step

# %% [markdown]
# ## The trace
# Four requests arrive together. Their `max_tokens` are 2, 6, 3 and 5.

# %%
prompts = ["One two three four", "The sky is", "Hello, my name is", "Paris is the capital of"]
ids = [engine.add_request(p, max_tokens=m, temperature=0) for p, m in zip(prompts, (2, 6, 3, 5))]
while scheduler.waiting or scheduler.running:
    engine.step()
for i in ids:
    out = engine.get_output(i)
    print(i, out.completion_tokens, "tokens:", repr(out.text))

# %% [markdown]
# Each prefill step admits what fits the 12-token budget (at least one prompt), then decode steps
# run everyone admitted so far. A request leaves the batch the step it finishes: the batch
# shrinks without waiting for the slowest, which is what "continuous" means.
#
# ## Nothing is left behind
# Every finished request gave its pages back.

# %%
print("running", len(scheduler.running), "waiting", len(scheduler.waiting),
      "free pages", runner.allocator.num_free, "of", runner.allocator.num_pages)
