# %% [markdown]
# # Stage 09: which graph a decode step replays
#
# On a GPU, stage 09 records the decode forward as CUDA graphs, one per *bucket*: a batch size
# (1, 2, 4, 8, then steps of 8) and a packed-key buffer length (a power of two). A step runs the
# smallest bucket that holds it; the rows it does not fill are padding rows. A CPU has no graphs,
# but `CudaGraphRunner(capture=False)` runs the same buffered forward without recording, so
# everything around the graph can be watched here. Run it with
# `python docs/walkthroughs/09_graph_buckets.py`.

# %%
from common.sampling import SamplingParams
from stage09_cuda_graph import Engine
from stage09_cuda_graph.cuda_graph_runner import CudaGraphRunner, batch_buckets, key_bucket

print("batch buckets up to 64:", batch_buckets(64))
print("key buckets for 300, 1500, 5000 keys:", [key_bucket(n) for n in (300, 1500, 5000)])

# %% [markdown]
# ## Every decode step's bucket
# Five requests with different `max_tokens`, graphs up to batch 8. We wrap `run` to print each
# replayed step: real rows, the bucket, and how many rows are padding.

# %%
engine = Engine(page_size=4)
runner = engine.runner
graphs = CudaGraphRunner(runner.model, runner.attention_backend, runner.allocator.num_pages,
                         max_bs=8, max_context=runner.config.max_position_embeddings, capture=False)
runner.graphs = graphs
original_run = graphs.run


def traced_run(batch, bucket):
    rows = batch.sizes.num_seqs
    print(f"decode {rows} rows, {batch.sizes.total_keys:3d} keys -> graph (bs {bucket[0]}, keys {bucket[1]}), "
          f"{bucket[0] - rows} padding rows")
    hidden = original_run(batch, bucket)
    if bucket[0] == 8 and not first_step:  # keep the buffers and the plan of the first padded step
        plan = graphs.graphs[bucket].attention
        first_step.update(inputs=graphs.inputs[:, :8].tolist(), slots=plan.slots.tolist(), cu_seqlens_k=plan.cu_seqlens_k.tolist())
    return hidden


first_step = {}
graphs.run = traced_run
prompts = ["One", "Two words", "Three small words", "Four words in total", "Five of them, all words"]
outputs = engine.generate_batch(prompts, [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (2, 3, 4, 6, 8)])

# %% [markdown]
# The prefill step is not in the list: prompts run eagerly. Then five rows decode in the
# batch-8 graph with 3 padding rows; as requests finish, the batch shrinks into the graphs of
# 4, 2 and 1.
#
# ## The plan the graph computes
# The host only copies each row's token, position, page-table row and length into fixed
# buffers. The graph computes the rest on the device: where each new token's K/V goes and which
# slots each sequence's keys are read from. Padding rows use a page-table row of their own, which
# points at a padding page no request owns.

# %%
for name, values in zip(("token ids", "positions", "table rows", "lengths"), first_step["inputs"]):
    print(f"{name:>16}: {values}")
print("  new-token slots:", first_step["slots"])
print("key ranges (cu_seqlens_k):", first_step["cu_seqlens_k"])
print("padding slot:", graphs.padding_slot, " padding row:", graphs.padding_row)
