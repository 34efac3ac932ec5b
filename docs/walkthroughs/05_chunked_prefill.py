# %% [markdown]
# # Stage 05: a long prompt in chunks, between decodes
#
# Without chunking, a long prompt's prefill is one big step, and every running request waits
# for it: their next tokens stall. Stage 05 cuts prompts into chunks of `chunked_prefill_size`
# tokens and puts one chunk into each step *beside* the decodes. Here two short requests are
# decoding when a 100-token prompt arrives; chunks are 32 tokens. Run it with
# `python docs/walkthroughs/05_chunked_prefill.py`.

# %%
from stage05_chunked import Engine

long_prompt = " ".join(["word"] * 100)


def trace(engine):
    """Print, for every step, how many tokens each request feeds (1 = a decode)."""
    runner, original_step = engine.runner, engine.runner.step

    def traced_step(requests, new_lengths):
        print("  step:", ", ".join(f"r{r.id}+{n}" for r, n in zip(requests, new_lengths)), f"({sum(new_lengths)} tokens)")
        return original_step(requests, new_lengths)

    runner.step = traced_step


def run(engine):
    short = [engine.add_request(p, max_tokens=8, temperature=0) for p in ("The sky is", "Once upon a time")]
    for _ in range(2):  # the short ones are decoding...
        engine.step()
    engine.add_request(long_prompt, max_tokens=2, temperature=0)  # ... when the long prompt arrives
    while engine.scheduler.waiting or engine.scheduler.running:
        engine.step()
    return [engine.get_output(i).text for i in short]


# %% [markdown]
# ## With chunks of 32

# %%
with Engine(chunked_prefill_size=32) as engine:
    trace(engine)
    chunked = run(engine)

# %% [markdown]
# Every step still decodes r0 and r1 (`+1` each), and the long prompt (`r2`) advances by up to
# 32 tokens beside them: its ~100 tokens take four steps, and the short requests never pause.
#
# ## Without chunks
# `chunked_prefill_size=-1` (SGLang's spelling) runs the whole prompt as one prefill step, in which
# the running requests feed nothing (request ids keep counting, so here they are r3, r4 and the
# long r5). On a GPU, with a prompt of thousands of tokens, that step is a visible stall in their
# streams.

# %%
with Engine(chunked_prefill_size=-1) as engine:
    trace(engine)
    whole = run(engine)

# %% [markdown]
# Same tokens either way: chunking changes when work happens, not what is computed.

# %%
print(chunked)
assert chunked == whole
