"""The MoE path used inside CUDA graphs (every expert on every token) equals the routed path."""

import torch

from common.config import ModelConfig
from common.qwen3 import SparseMoE


def test_every_expert_path_equals_the_routed_path(checkpoints):
    config = ModelConfig.from_file(checkpoints["moe"])
    torch.manual_seed(0)
    moe = SparseMoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(13, config.hidden_size)
    weights, expert_ids = moe.route(x)
    torch.testing.assert_close(moe.forward_every_expert(x, weights, expert_ids), moe(x), rtol=1e-5, atol=1e-5)
    moe.local_experts = range(config.num_experts // 2)  # expert parallelism: only this rank's half
    routed = moe(x)
    torch.testing.assert_close(moe.forward_every_expert(x, weights, expert_ids), routed, rtol=1e-5, atol=1e-5)
    assert routed.abs().sum() > 0
