# %% [markdown]
# # Stage 15: one prompt under two adapters and the base, in one batch
#
# Two LoRA adapters are made here with PEFT on the built-in model, from random weights (a real one
# comes out of a fine-tune; the files look the same). The engine serves the same prompt three
# ways in one `generate_batch`: under adapter `a`, under the base model, under adapter `b`. We
# record the adapter slot of every token row the model sees, and which columns of the stacked
# shrink each row keeps. Run it with `python docs/walkthroughs/15_lora_batch.py`.

# %%
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from common.loader import resolve_model_path
from stage15_lora import Engine

folder, root = resolve_model_path(None), Path(tempfile.mkdtemp())
targets = {"a": ["q_proj", "v_proj"], "b": ["gate_proj", "up_proj", "down_proj"]}
for seed, (name, modules) in enumerate(targets.items()):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(folder)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=modules, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(root / name)
print(sorted(p.name for p in (root / "a").iterdir()))

engine = Engine(lora_paths={name: str(root / name) for name in targets}, page_size=4)
pool = engine.runner.lora
a, b = pool.weights[(0, "qkv_proj")]
print(f"backend {pool.backend}, {len(pool.slot_names)} slots (0: the base)")
print(f"layer 0 qkv_proj: A {list(a.shape)}, B {list(b.shape)}")

# %% [markdown]
# `A` stacks the q, k and v parts (rank 8 each: 24 rows) for every slot; `B` puts them
# block-diagonally, so adapter `a`'s q part lands in the q rows. Adapter `b` changes only the MLP,
# so its `qkv_proj` slot stays zeros.
#
# ## Rows and slots
# Each forward, every token row carries its adapter's slot. The default (dense) backend shrinks
# every row by every slot's `A` in one matmul and keeps, per row, only its own slot's columns: the
# mask printed below (slot `s` owns columns `24 s .. 24 s + 23`).

# %%
steps = []
begin = pool.begin


def recording_begin(slots):
    begin(slots)
    if slots is not None:
        steps.append((slots.tolist(), pool.rows.mask(24, torch.float32)))


pool.begin = recording_begin
prompt = engine.tokenizer.apply_chat_template("Name three colours.")
outs = engine.generate_batch([prompt] * 3, lora_path=["a", None, "b"],
                             max_tokens=12, temperature=0)
pool.begin = begin


def runs(slots):
    out, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            out.append(f"{slots[start]}x{i - start}")
            start = i
    return " ".join(out)


for i in (0, 1, len(steps) - 1):
    print(f"forward {i}: rows {runs(steps[i][0])}")
slots, mask = steps[1]
for row, slot in enumerate(slots):
    kept = mask[row].nonzero().flatten().tolist()
    print(f"decode row {row} (slot {slot}) keeps columns {kept[0]}..{kept[-1]}")

# %% [markdown]
# The first forward is the three prompts (each prompt's rows carry its slot), then each decode
# step has one row per request. A base row keeps slot 0's columns, whose `A` and `B` are zeros.
# (`lora_backend="grouped"` instead sorts the rows by slot and multiplies each slot's segment by
# its own adapter only.)
#
# ## Three answers
# The same prompt, three models:

# %%
for name, out in zip(["a", "base", "b"], outs):
    print(f"{name:>4}: {out.text!r}")

# %% [markdown]
# ## The cache keeps them apart
# Run the prompt again under each: each finds only the pages its own first run cached.

# %%
again = engine.generate_batch([prompt] * 3, lora_path=["a", None, "b"],
                              max_tokens=12, temperature=0)
print("prompt tokens:", len(engine.tokenizer.encode(prompt)))
for name, out in zip(["a", "base", "b"], again):
    print(f"{name:>4}: {out.cached_tokens} cached")
for slot, name in enumerate(pool.slot_names[:4]):
    print(f"slot {slot}: {name or ('(base)' if slot == 0 else '(empty)')}")
engine.shutdown()
