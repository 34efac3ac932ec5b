"""Qwen2 / Qwen2.5, Qwen2-MoE and Mistral run through the Qwen3 model code, switched by their configs.

Logits parity for every family is in test_model_parity.py and greedy tokens per
stage in ladder/test_parity.py; here: what each family switches on, and the
sliding window, which is served only up to its width.
"""

import warnings

import pytest
import torch

from checkpoints import write_checkpoint
from common.config import ModelConfig
from common.loader import load_model
from conftest import STAGES, stage_engine_class
from reference import DictCache, load_hf


def test_each_family_switches_on_its_own_parts(checkpoints):
    qwen2, qwen2_moe, mistral = (ModelConfig.from_file(checkpoints[k]) for k in ("qwen2", "qwen2_moe", "mistral"))
    assert qwen2.qkv_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    assert qwen2_moe.qkv_bias and qwen2_moe.shared_expert_intermediate_size == 48 and not qwen2_moe.qk_norm
    assert not mistral.qkv_bias and not mistral.qk_norm and mistral.sliding_window is None
    model, _, _ = load_model(checkpoints["qwen2_moe"])
    moe = model.model.layers[1].mlp
    assert moe.shared_expert is not None and moe.shared_expert_gate.weight.shape == (1, 64)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None


def test_shared_expert_changes_the_output(checkpoints):
    """Without its shared expert the Qwen2-MoE block computes something else: the test checkpoint exercises it."""
    model, _, _ = load_model(checkpoints["qwen2_moe"])
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    moe = model.model.layers[1].mlp
    with torch.no_grad():
        full = moe(x)
        moe.shared_expert, shared = None, moe.shared_expert
        routed_only = moe(x)
        moe.shared_expert = shared
    assert (full - routed_only).abs().max() > 1e-2


def sliding_checkpoint(tmp_path, builtin_folder, kind, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own notes about sliding windows
        return write_checkpoint(kind, tmp_path / kind, builtin_folder, **overrides)


def test_sliding_window_narrower_than_the_context_caps_it_with_a_warning(tmp_path, builtin_folder):
    folder = sliding_checkpoint(tmp_path, builtin_folder, "mistral", sliding_window=32)
    with pytest.warns(UserWarning, match="sliding_window=32 .* up to 32 tokens"):
        config = ModelConfig.from_file(folder)
    assert config.sliding_window == 32 and config.max_position_embeddings == 32


def test_qwen2_window_counts_only_when_switched_on(tmp_path, builtin_folder):
    off = sliding_checkpoint(tmp_path / "off", builtin_folder, "qwen2", sliding_window=16, use_sliding_window=False)
    assert ModelConfig.from_file(off).max_position_embeddings == 512
    on = sliding_checkpoint(tmp_path / "on", builtin_folder, "qwen2", sliding_window=16, use_sliding_window=True,
                            max_window_layers=0)
    with pytest.warns(UserWarning, match="sliding_window=16"):
        assert ModelConfig.from_file(on).max_position_embeddings == 16


@torch.no_grad()
def test_within_the_window_logits_equal_transformers_sliding_attention(tmp_path, builtin_folder):
    folder = sliding_checkpoint(tmp_path, builtin_folder, "mistral", sliding_window=32)
    ids = torch.randint(3, 49152, (32,), generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning):
        model, _, _ = load_model(folder)
    ours = model.compute_logits(model(ids, torch.arange(32), DictCache()))
    torch.testing.assert_close(ours, load_hf(folder)(ids[None]).logits[0], atol=2e-5, rtol=1e-5)
    # Beyond the window the two differ: that is why longer contexts are refused.
    longer = torch.randint(3, 49152, (40,), generator=torch.Generator().manual_seed(6))
    full = model.compute_logits(model(longer, torch.arange(40), DictCache()))
    assert (full[32:] - load_hf(folder)(longer[None]).logits[0, 32:]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def windowed_checkpoint(tmp_path_factory, builtin_folder):
    return sliding_checkpoint(tmp_path_factory.mktemp("windowed"), builtin_folder, "mistral", sliding_window=32)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_refuses_a_prompt_beyond_the_window_and_names_it(stage, windowed_checkpoint):
    with pytest.warns(UserWarning):
        engine = stage_engine_class(stage)(model_path=str(windowed_checkpoint), device="cpu")
    with engine:
        with pytest.raises(ValueError, match=r"context is 32 \(its sliding_window=32"):
            engine.generate(list(range(3, 43)), max_tokens=4)
        out = engine.generate(list(range(3, 23)), max_tokens=40, temperature=0, ignore_eos=True)
        assert out.finish_reason == "length" and out.prompt_tokens + out.completion_tokens == 32
