# %% [markdown]
# # A forward pass by hand
#
# This walkthrough runs the built-in model (SmolLM2-135M-Instruct, a Llama-family model that
# `common/qwen3.py` runs as "Qwen3 without q/k norm") one piece at a time: tokenize, embed, one
# decoder layer, the rest of the stack, logits, and a sampled token. Run it with
# `python docs/walkthroughs/01_forward_pass.py`.

# %%
import torch

from common.attention import causal_attention
from common.loader import load_model
from common.tokenizer import Tokenizer

model, config, folder = load_model(None, device="cpu")
tokenizer = Tokenizer(folder)
print(config.architecture, config.num_hidden_layers, "layers,", config.num_attention_heads, "heads")

# %% [markdown]
# ## 1. Tokenize
# Text becomes integer ids; positions say where each token sits.

# %%
ids = torch.tensor(tokenizer.encode("The capital of France is"))
positions = torch.arange(len(ids))
print(ids.tolist(), [tokenizer.decode([i]) for i in ids.tolist()])

# %% [markdown]
# ## 2. Embed
# Each id picks one row of the embedding matrix: `[tokens] -> [tokens, hidden]`.

# %%
x = model.model.embed_tokens(ids)
print(x.shape)

# %% [markdown]
# ## 3. One decoder layer, spelled out
# The model hands each layer's q, k, v to an *attention backend*. Here the backend is a dict:
# enough for one sequence. Stage01 swaps in a contiguous cache, stage02 a paged pool.

# %%
class DictCache:
    def __init__(self):
        self.k, self.v = {}, {}

    def __call__(self, layer_index, q, k, v):
        self.k[layer_index] = torch.cat([self.k.get(layer_index, k[:0]), k])
        self.v[layer_index] = torch.cat([self.v.get(layer_index, v[:0]), v])
        return causal_attention(q, self.k[layer_index], self.v[layer_index])


cache = DictCache()
cos, sin = model.model.rotary_cos_sin(positions, x.dtype)
layer = model.model.layers[0]
with torch.no_grad():
    attn_out = layer.self_attn(layer.input_layernorm(x), cos, sin, cache)  # attention sub-block
    h = x + attn_out                                                       # residual
    h = h + layer.mlp(layer.post_attention_layernorm(h))                   # SwiGLU MLP + residual
print("after layer 0:", h.shape, "cached keys:", cache.k[0].shape)

# %% [markdown]
# ## 4. The rest of the stack, the final norm, and logits
# Only the last token's logits matter for the next token.

# %%
with torch.no_grad():
    for layer in model.model.layers[1:]:
        h = layer(h, cos, sin, cache)
    logits = model.compute_logits(model.model.norm(h)[-1:])
top = logits[0].softmax(-1).topk(5)
print([(tokenizer.decode([i]), round(p, 3)) for p, i in zip(top.values.tolist(), top.indices.tolist())])

# %% [markdown]
# ## 5. Sample
# Greedy takes the argmax; sampling divides by a temperature and draws.

# %%
greedy = logits.argmax(-1).item()
generator = torch.Generator().manual_seed(0)
sampled = torch.multinomial((logits[0] / 0.7).softmax(-1), 1, generator=generator).item()
print("greedy:", repr(tokenizer.decode([greedy])), " sampled:", repr(tokenizer.decode([sampled])))
assert tokenizer.decode([greedy]).strip() == "Paris"
