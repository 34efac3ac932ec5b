"""Helpers that run transformers' own models, the correctness oracle."""

import torch
from transformers import AutoModelForCausalLM

from common.attention import causal_attention


def load_hf(folder, **kwargs):
    """transformers' model for ``folder`` in fp32, eval mode."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` for one prompt, never stopping early at EOS."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


class DictCache:
    """A minimal attention backend: keeps every layer's keys/values in a list (one sequence)."""

    def __init__(self):
        self.k, self.v = {}, {}

    def __call__(self, layer_index, q, k, v):
        self.k[layer_index] = torch.cat([self.k.get(layer_index, k[:0]), k])
        self.v[layer_index] = torch.cat([self.v.get(layer_index, v[:0]), v])
        return causal_attention(q, self.k[layer_index], self.v[layer_index])


class RecordingSampler:
    """Wraps an engine's sampler and keeps a copy of every logits batch it is handed."""

    def __init__(self, sampler):
        self.sampler, self.seen = sampler, []

    def __call__(self, logits, *args):
        self.seen.append(logits.clone())
        return self.sampler(logits, *args)

    def __getattr__(self, name):
        return getattr(self.sampler, name)
