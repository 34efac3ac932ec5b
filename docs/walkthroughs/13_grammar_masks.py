# %% [markdown]
# # Stage 13: the tokens a grammar allows, step by step
#
# A constrained request carries a grammar: here a small JSON schema. Before each sampling step its
# matcher says which token ids may come next (a bitmask over the vocabulary); every other logit
# becomes -inf. Where only one continuation is possible, the matcher forces it and the engine
# appends those tokens without sampling (jump-forward). We step one request on the built-in model
# and print, at each step, how many tokens were allowed and what was appended. Run it with
# `python docs/walkthroughs/13_grammar_masks.py`.

# %%
import json

import torch

from stage13_structured import Engine
from stage13_structured.grammar import fill_masks, mask_words

schema = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
engine = Engine(disable_overlap_schedule=True)  # each step's tokens are read before the next step
vocab = engine.config.vocab_size


def allowed_tokens(grammar) -> list[int]:
    """The token ids the grammar allows next: the set bits of its mask row."""
    row = torch.zeros(1, mask_words(vocab), dtype=torch.int32)
    fill_masks([grammar], row)
    bits = (row[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


# %% [markdown]
# ## Step by step
# Each line is one step: how many of the 49,152 tokens the mask allowed, a few of them, and the
# tokens the step appended. The first step is the prompt's forward. A step that appends several
# tokens sampled one and then appended the tokens the grammar forced.

# %%
rid = engine.add_request("Is the sky blue? Reply in JSON.", json_schema=schema, max_tokens=40, temperature=0)
request = next(r for r in engine.scheduler.waiting if r.id == rid)  # the live request, queued for its first step
steps = 0
while not request.finished:
    allowed = allowed_tokens(request.grammar)
    before = len(request.output_ids)
    engine.step()
    steps += 1
    new = request.output_ids[before:]
    shown = ", ".join(repr(engine.tokenizer.decode([t])) for t in allowed[:4])
    print(f"{len(allowed):>6} allowed ({shown}{', ...' if len(allowed) > 4 else ''})"
          f"  ->  appended {[engine.tokenizer.decode([t]) for t in new]}")
output = engine.get_output(rid)
print(repr(output.text), output.finish_reason, f"in {steps} steps")
print(json.loads(output.text))

# %% [markdown]
# Where a key or a fixed piece of syntax must come, the grammar forces it; inside
# the enum only the tokens that start "yes" or "no" are; once the object is closed the grammar is
# complete and the request ends with "stop".
#
# ## Without jump-forward
# The same text, one sampled token a step:

# %%
with Engine(disable_overlap_schedule=True, disable_jump_forward=True) as plain:
    steps, rid = 0, plain.add_request("Is the sky blue? Reply in JSON.", json_schema=schema, max_tokens=40, temperature=0)
    while (slow := plain.get_output(rid)) is None:
        plain.step()
        steps += 1
engine.shutdown()
print(f"{steps} steps without jump-forward; the same text: {slow.text == output.text}")
