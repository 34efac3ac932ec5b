"""Loading finds checkpoints by every route and refuses mismatched ones clearly."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.config import ModelConfig
from common.loader import load_model, read_checkpoint_tensors, resolve_model_path
from conftest import ROOT, STAGES


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_every_tensor_with_the_asked_dtype(checkpoints):
    model, config, _ = load_model(checkpoints["dense"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert config.architecture == "Qwen3ForCausalLM" and config.qk_norm


def test_tied_embeddings_share_one_tensor(checkpoints):
    model, config, _ = load_model(checkpoints["llama"])
    assert config.tie_word_embeddings and not config.qk_norm
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_missing_tensor_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["dense"], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_unexpected_tensor_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["dense"], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected.*extra"):
        load_model(folder)


def test_wrong_shape_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["dense"], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mlp.*shape"):
        load_model(folder)


def test_sharded_checkpoint_loads_like_a_single_file(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["dense"], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    (folder / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[::2]}, folder / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, folder / "model-00002-of-00002.safetensors")
    sharded, _, _ = load_model(folder)
    single, _, _ = load_model(checkpoints["dense"])
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name


def test_fused_expert_tensors_are_split_per_expert(checkpoints, tmp_path):
    """Some MoE checkpoints stack experts in one [experts, ...] tensor per layer."""
    per_expert = read_checkpoint_tensors(checkpoints["moe"])
    folder = copy_checkpoint(checkpoints["moe"], tmp_path / "ckpt")
    fused = {n: t for n, t in per_expert.items() if ".experts." not in n}
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = [torch.cat([per_expert[f"{prefix}{e}.gate_proj.weight"], per_expert[f"{prefix}{e}.up_proj.weight"]]) for e in range(8)]
        fused[prefix + "gate_up_proj"] = torch.stack(gate_up)
        fused[prefix + "down_proj"] = torch.stack([per_expert[f"{prefix}{e}.down_proj.weight"] for e in range(8)])
    save_file(fused, folder / "model.safetensors")
    assert read_checkpoint_tensors(folder).keys() == per_expert.keys()
    for name, tensor in read_checkpoint_tensors(folder).items():
        assert torch.equal(tensor, per_expert[name]), name


def test_unsupported_architecture_is_refused(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["dense"], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FalconForCausalLM.*not supported"):
        load_model(folder)


@pytest.mark.parametrize("path", ["/no/such/folder", "./missing", "not-a-hub-id-or-folder"])
def test_unknown_local_path_is_refused(path):
    with pytest.raises(ValueError, match="model path"):
        resolve_model_path(path)


def test_unreachable_hub_id_is_a_value_error(monkeypatch, tmp_path):
    """Offline (as in tests), a hub id that is not cached fails with a clear ValueError."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="could not be fetched"):
        resolve_model_path("nobody/no-such-model")


def test_config_reads_transformers_5_rope_parameters(checkpoints):
    config = ModelConfig.from_file(checkpoints["llama"])
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    moe = ModelConfig.from_file(checkpoints["moe"])
    assert (moe.num_experts, moe.num_experts_per_tok, moe.mlp_only_layers) == (8, 2, [0])
    assert [moe.is_moe_layer(i) for i in range(3)] == [False, True, True]


def test_a_worker_rank_imports_no_compiler_and_no_transformers(checkpoints):
    """What a parallel engine's worker process does before its first step: import its stage and
    build its part of the model. The model is built on the meta device and filled from the
    checkpoint, so no layer runs its random init and no buffer is computed on meta (either goes
    through torch's reference ops, whose first use imports torch._dynamo: ~1.5 s); and only rank 0
    tokenizes, so transformers (~1 s) is not imported. A fresh process: this one has both."""
    newest = STAGES[-1]
    code = (f"import sys\nimport {newest}\nfrom common.config import ModelConfig\nfrom common.loader import load_model\n"
            f"from {newest}.parallel import TensorParallelShard\n"
            f"path = {str(checkpoints['moe'])!r}\n"
            "load_model(path)\n"
            "load_model(path, shard=TensorParallelShard(ModelConfig.from_file(path), 0, 2))  # a rank's vocabulary slice\n"
            "print(sorted(m for m in ('torch._dynamo', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported: {result.stdout.strip()}"
