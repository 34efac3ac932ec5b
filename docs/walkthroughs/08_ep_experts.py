# %% [markdown]
# # Stage 08: which experts each rank holds, and where tokens go
#
# A mixture-of-experts layer has many expert MLPs and a router that sends each token to its
# top-k. With expert parallelism (`ep_size=N`) each rank holds whole experts, 1/N of them,
# instead of a slice of every expert. The built-in model is dense, so this walkthrough writes a
# tiny random Qwen3-MoE checkpoint with transformers (8 experts, 2 per token), then looks at the
# routing and at what each of 2 ranks would hold. Run it with
# `python docs/walkthroughs/08_ep_experts.py`.

# %%
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from common.config import ModelConfig
from common.loader import resolve_model_path
from stage08_ep import Engine
from stage08_ep.parallel import TensorParallelShard

folder = Path(tempfile.mkdtemp()) / "tiny-moe"
torch.manual_seed(0)
config = Qwen3MoeConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_experts=8, num_experts_per_tok=2, initializer_range=0.1, tie_word_embeddings=False)
Qwen3MoeForCausalLM(config).save_pretrained(folder)
for name in ("tokenizer.json", "tokenizer_config.json"):  # borrow the built-in model's tokenizer
    shutil.copy(resolve_model_path(None) / name, folder / name)

# %% [markdown]
# ## Where the tokens go
# Each MoE layer can count how many tokens the router sends to each expert
# (`expert_token_counts`, which the engine turns on). One generation:

# %%
with Engine(model_path=str(folder)) as engine:
    out = engine.generate("Experts share the work", max_tokens=8, temperature=0, ignore_eos=True)
    for i, layer in enumerate(engine.runner.model.model.layers):
        print(f"layer {i}: tokens per expert", layer.mlp.expert_token_counts.tolist())
single_text = out.text

# %% [markdown]
# Every token picks 2 of the 8, so each layer's counts add up to twice the tokens it saw.
#
# ## What each rank holds
# `TensorParallelShard` with `ep_size=2`: rank 0 holds experts 0-3, rank 1 experts 4-7, each whole.
# Attention and the router are replicated. In the forward, every rank routes all tokens, runs
# the ones sent to *its* experts, and one all-reduce sums the weighted outputs.

# %%
model_config = ModelConfig.from_file(folder)
for rank in range(2):
    shard = TensorParallelShard(model_config, rank, size=1, ep_size=2)
    print(f"rank {rank}: experts {list(shard.local_experts)}, {shard.heads} attention heads (all of them)")

# %% [markdown]
# ## Two processes, the same text
# As in stage 07, worker processes start from a fresh interpreter that imports the main script,
# so the multi-process engine starts from the command line:

# %%
cli = [sys.executable, "-m", "stage08_ep", "Experts share the work", "--model-path", str(folder),
       "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--no-stream"]
env = {**os.environ, "PYTHONPATH": os.getcwd()}
two = subprocess.run(cli + ["--ep-size", "2"], capture_output=True, text=True, env=env, check=True).stdout
print("ep_size=2:", repr(two))
print("same text as one process:", two.rstrip("\n") == single_text)
shutil.rmtree(folder.parent)
