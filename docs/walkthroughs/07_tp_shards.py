# %% [markdown]
# # Stage 07: what each tensor-parallel rank holds
#
# With `tp_size=N`, every large weight matrix is split N ways and each rank (a process with its
# own device) holds one part. The built-in model has 9 query heads and 3 KV heads, so it splits
# 3 ways. First we load each rank's part in this process and look at the shapes, then we run a
# real `tp_size=3` engine (three processes talking over gloo) and compare its tokens with one
# process's. Run it with `python docs/walkthroughs/07_tp_shards.py`.

# %%
from common.config import ModelConfig
from common.loader import load_model, resolve_model_path
from stage07_tp.parallel import TensorParallelShard

config = ModelConfig.from_file(resolve_model_path(None))
whole, _, _ = load_model(None, device="cpu")
print(f"{config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads, "
      f"MLP {config.intermediate_size}, vocabulary {config.vocab_size}")


def shapes(model):
    layer = model.model.layers[0]
    return {"embed": model.model.embed_tokens.weight.shape, "qkv": layer.self_attn.qkv_proj.weight.shape,
            "o": layer.self_attn.o_proj.weight.shape, "gate_up": layer.mlp.gate_up_proj.weight.shape,
            "down": layer.mlp.down_proj.weight.shape, "lm_head": model.lm_head.weight.shape}


def megabytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


# %% [markdown]
# ## The shapes, whole and per rank
# Column-parallel layers (qkv, gate_up, the embedding and lm_head's vocabulary) lose *rows*:
# each rank computes its own heads, MLP units and vocabulary slice. Row-parallel layers (o,
# down) lose *columns*: each rank computes a partial sum that one all-reduce adds up.

# %%
print(f"whole   {megabytes(whole):6.1f} MiB ", {k: tuple(v) for k, v in shapes(whole).items()})
for rank in range(3):
    part, _, _ = load_model(None, device="cpu", shard=TensorParallelShard(config, rank, 3))
    print(f"rank {rank}  {megabytes(part):6.1f} MiB ", {k: tuple(v) for k, v in shapes(part).items()})

# %% [markdown]
# Each rank holds a third of the bytes (norms are tiny and replicated).
#
# ## Three processes, the same text
# Rank 0 schedules; each step it broadcasts the batch and every rank runs its share of the
# forward. One process first, in this one:

# %%
from stage07_tp import Engine

prompt = "The three primary colours are"
with Engine(device="cpu") as engine:
    one = engine.generate(prompt, max_tokens=8, temperature=0).text
print("tp_size=1:", repr(one))

# %% [markdown]
# Worker processes start from a fresh interpreter (multiprocessing's forkserver:
# `common/processes.py`), which imports the main script first, so a script (or notebook) starts a
# multi-process engine from the command line, as a learner would:

# %%
import os
import subprocess
import sys

cli = [sys.executable, "-m", "stage07_tp", prompt, "--max-tokens", "8", "--temperature", "0", "--no-stream"]
env = {**os.environ, "PYTHONPATH": os.getcwd()}
three = subprocess.run(cli + ["--tp-size", "3"], capture_output=True, text=True, env=env, check=True).stdout
print("tp_size=3:", repr(three))
print("same text:", three.rstrip("\n") == one)

# %% [markdown]
# On the CPU the all-reduce adds partial sums in another order than one matrix product would, so
# logits differ in the last bits; greedy text agrees here. (`tests/stage07_tp` checks the logits
# and tokens against one process for every model kind.)
