# %% [markdown]
# # Stage 19: micro-batches moving down a pipeline
#
# The built-in model (30 layers) on two pipeline ranks, gloo on the CPU: rank 0 is this
# process, rank 1 a worker process. We print which rank holds which layers and how big each
# rank's KV pool is, then run eight requests and print, step by step, which micro-batches rank 0
# has in flight. Run it with `python docs/walkthroughs/19_pipeline_micro_batches.py`.

# %%
from stage19_pipeline_parallel import Engine
from stage19_pipeline_parallel.pipeline import layer_partition

if __name__ == "__main__":  # the worker rank starts from a fresh interpreter: it imports this file too
    engine = Engine(pp_size=2, page_size=4)
    layers = engine.config.num_hidden_layers
    for rank, held in enumerate(layer_partition(layers, 2)):
        print(f"rank {rank}: layers {held.start}..{held.stop - 1}"
              + (" + embedding" if rank == 0 else " + final norm and logits"))
    print(f"rank 0's pool: {engine.runner.pool.k.shape[0]} layers of K/V per page, not {layers}")

# %% [markdown]
# Each step, rank 0 forms a micro-batch from requests that are not already in flight, runs its
# layers on it and sends the hidden states on; with two in flight it first samples the oldest,
# whose logits the last rank has sent back. The running requests are split between the two
# micro-batches, so neither rank waits for the other.

# %%
if __name__ == "__main__":
    ids = [engine.add_request(f"Story {i}: once upon a time", max_tokens=3, temperature=0) for i in range(8)]
    for step in range(1, 9):
        engine.step()
        flight = [sorted(r.id for r in micro.requests) for micro in engine.micro_batches]
        print(f"step {step}: in flight {flight}")
    engine.generate("drain", max_tokens=1)  # runs the rest to the end

# %% [markdown]
# Where the forwards fell in time is in `engine.runner.links.timeline`: rank 0's spans, and the
# last rank's, which it sends back with the logits. With two micro-batches in flight rank 0's
# forward of one overlaps rank 1's forward of the other; with `pp_async_batch_depth=1` they never
# do (`test_two_micro_batches_in_flight_keep_both_ranks_busy_at_once` checks both). The times
# differ from run to run, so here we count the forwards only.

# %%
if __name__ == "__main__":
    timeline = engine.runner.links.timeline
    mine = [span for span in timeline if span[0] == "rank 0"]
    print(f"rank 0 ran {len(mine)} forwards, the last rank {len(timeline) - len(mine)}")
    engine.shutdown()
