# %% [markdown]
# # Stage 10: the overlap timeline
#
# Without overlap, a step is: schedule, launch the forward, *wait* for its tokens, process them.
# The GPU idles while the host schedules and processes. Stage 10 launches step N+1 before it
# reads step N's tokens: a request's next input is a placeholder the device fills from step N's
# samples. Here we log the order of the host's events, with and without overlap. (On a CPU the
# forward runs during the launch call, so only the order shows, not the speed-up; the step
# profile in `benchmarks/` measures that on a GPU.) Run it with
# `python docs/walkthroughs/10_overlap_timeline.py`.

# %%
from stage10_overlap import Engine
from stage10_overlap.model_runner import LaunchedStep

log = []
original_launch, original_tokens = None, LaunchedStep.tokens


def traced_tokens(self):
    tokens = original_tokens(self)
    log.append(f"read step {self.step_number}: {sum(t is not None for t in tokens)} tokens")
    return tokens


LaunchedStep.tokens = traced_tokens


def run(engine):
    """Two requests, four tokens each; returns the log and the texts."""
    log.clear()
    runner, launch, steps = engine.runner, engine.runner.launch, iter(range(1, 100))

    def traced_launch(requests, new_lengths):
        placeholders = sum(r.pending_tokens > 0 for r in requests)  # last token not read yet
        launched = launch(requests, new_lengths)
        launched.step_number = next(steps)
        log.append(f"launch step {launched.step_number}: {len(requests)} requests"
                   + (f", {placeholders} with an input still on the device" if placeholders else ""))
        return launched

    runner.launch = traced_launch
    outputs = engine.generate_batch(["Overlap hides", "The host works while"], max_tokens=4, temperature=0, ignore_eos=True)
    return list(log), [o.token_ids for o in outputs]


# %% [markdown]
# ## Without overlap
# Each launch is followed by the read of the same step.

# %%
with Engine(disable_overlap_schedule=True) as engine:
    serial_log, serial_tokens = run(engine)
print("\n".join(serial_log))

# %% [markdown]
# ## With overlap
# Step N+1 is launched *before* step N is read: on a GPU its kernels are queued behind step N's,
# and the host's reading, detokenizing and scheduling happen while the GPU computes.

# %%
with Engine() as engine:
    overlap_log, overlap_tokens = run(engine)
print("\n".join(overlap_log))

# %% [markdown]
# From step 2 on, each launch feeds tokens the host has not read yet (placeholders resolved on
# the device). At the end the last step is read with nothing left to launch. Had a request hit a
# stop token, the host would learn it one step late and drop the extra token. The tokens are the
# same:

# %%
print(overlap_tokens == serial_tokens, overlap_tokens)
