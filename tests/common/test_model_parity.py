"""common/qwen3.py computes the same logits as transformers on the same weights."""

import pytest
import torch

from common.loader import load_model
from reference import DictCache, load_hf

KINDS = ["dense", "moe", "llama", "qwen2", "qwen2_moe", "mistral"]


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(0, 49152, (23,), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_prefill_logits_match_transformers(kind, checkpoints, prompt_ids):
    model, _, _ = load_model(checkpoints[kind])
    reference = load_hf(checkpoints[kind])(prompt_ids[None]).logits[0]
    ours = model.compute_logits(model(prompt_ids, torch.arange(len(prompt_ids)), DictCache()))
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_decode_step_by_step_matches_full_forward(kind, checkpoints, prompt_ids):
    """Prefill 10 tokens, then feed the rest one at a time through the cache."""
    model, _, _ = load_model(checkpoints[kind])
    reference = load_hf(checkpoints[kind])(prompt_ids[None]).logits[0]
    cache = DictCache()
    rows = [model.compute_logits(model(prompt_ids[:10], torch.arange(10), cache))]
    for pos in range(10, len(prompt_ids)):
        rows.append(model.compute_logits(model(prompt_ids[pos : pos + 1], torch.tensor([pos]), cache)))
    torch.testing.assert_close(torch.cat(rows), reference, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_moe_routes_tokens_to_many_experts(checkpoints, prompt_ids):
    """The MoE checkpoint really exercises routing: several experts receive tokens."""
    model, config, _ = load_model(checkpoints["moe"])
    moe_layers = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert len(moe_layers) == config.num_hidden_layers - len(config.mlp_only_layers)
    x = model.model.embed_tokens(prompt_ids)
    _, expert_ids = moe_layers[0].route(x)
    assert len(expert_ids.unique()) >= config.num_experts // 2
