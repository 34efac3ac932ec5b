"""The model's fused spellings compute what the plain ones do (issue 48: fewer kernels a layer)."""

import torch
from torch import nn

from common.qwen3 import add_linear


def test_a_plain_projection_adds_into_the_residual_in_place():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(8, 6, bias=False)
    x, residual = torch.randn(3, 8, generator=gen), torch.randn(3, 6, generator=gen)
    expected = residual + linear(x)
    out = add_linear(residual, linear, x)
    assert out is residual  # one matmul that accumulates into the stream
    torch.testing.assert_close(out, expected)


def test_other_projections_add_as_written():
    """A biased layer and any subclass (tensor-parallel layers sum over ranks inside forward) are
    called, then added: the residual itself is left alone."""

    class Summed(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)  # stands for an all-reduce over two ranks

    gen = torch.Generator().manual_seed(1)
    x, residual = torch.randn(3, 8, generator=gen), torch.randn(3, 6, generator=gen)
    for linear in (nn.Linear(8, 6, bias=True), Summed(8, 6, bias=False)):
        before = residual.clone()
        out = add_linear(residual, linear, x)
        assert out is not residual
        torch.testing.assert_close(residual, before)
        torch.testing.assert_close(out, residual + linear(x))


def test_one_call_normalizes_q_and_k_heads_each_with_its_own_weight():
    """Qwen3's q and k norms as one normalization plus the stacked weights equal the two norms
    applied head by head (q heads with q_norm's weight, k heads with k_norm's)."""
    from common.config import ModelConfig
    from common.qwen3 import Attention
    from common.rope import apply_rotary

    config = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=16, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    assert config.qk_norm
    gen = torch.Generator().manual_seed(2)
    attention = Attention(config, 0)
    for parameter in attention.parameters():
        parameter.data = torch.randn(parameter.shape, generator=gen)
    attention.stack_head_norms()
    x = torch.randn(3, 32, generator=gen)
    cos, sin = torch.randn(2, 3, 8, generator=gen)
    seen = {}

    def backend(layer_index, q, k, v):
        seen["q"], seen["k"] = q, k
        return q

    attention(x, cos, sin, backend, residual=torch.zeros(3, 32))
    q, k, _ = attention.qkv_proj(x).view(3, 8, 8).split([4, 2, 2], dim=1)
    torch.testing.assert_close(seen["q"], apply_rotary(attention.q_norm(q), cos, sin))
    torch.testing.assert_close(seen["k"], apply_rotary(attention.k_norm(k), cos, sin))


def test_the_head_norm_reads_a_contiguous_tensor(monkeypatch):
    """The q/k heads alone are a strided view of the qkv projection's output, which the GPU's
    norm kernel would first copy out (a prompt chunk's largest copy): the norm is given every
    head of qkv, a contiguous tensor, and only q and k are kept."""
    import common.qwen3
    from common.config import ModelConfig
    from common.qwen3 import Attention

    config = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=16, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    attention = Attention(config, 0)
    attention.stack_head_norms()
    inputs = []
    rms_norm = common.qwen3.F.rms_norm

    def recording(x, *args, **kwargs):
        inputs.append(x)
        return rms_norm(x, *args, **kwargs)

    monkeypatch.setattr(common.qwen3.F, "rms_norm", recording)
    cos, sin = torch.randn(2, 3, 8)
    attention(torch.randn(3, 32), cos, sin, lambda layer_index, q, k, v: q)
    assert [x.is_contiguous() for x in inputs] == [True]


def test_rotary_is_transformers_rotate_half_spelling():
    """``apply_rotary`` with ``[cos, cos]`` and ``[-sin, sin]``: x * cos + rotate_half(x) * sin."""
    from common.rope import apply_rotary

    gen = torch.Generator().manual_seed(4)
    x, angles = torch.randn(5, 3, 8, generator=gen), torch.rand(5, 4, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotate_half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    expected = x * cos[:, None] + rotate_half * sin[:, None]
    torch.testing.assert_close(apply_rotary(x, cos, torch.cat([-angles.sin(), angles.sin()], -1)), expected)
