"""RoPE frequencies for every supported rope_scaling type equal transformers' own."""

import pytest
import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from common.rope import rope_frequencies

SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: f"{s['rope_type']}-{s['factor']}")
def test_scaled_frequencies_match_transformers(scaling):
    head_dim, theta, max_positions = 128, 1_000_000.0, 131072
    config = Qwen3Config(head_dim=head_dim, max_position_embeddings=max_positions,
                         rope_parameters={"rope_theta": theta, **scaling})
    expected_freq, expected_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    inv_freq, factor = rope_frequencies(head_dim, theta, scaling, max_positions)
    torch.testing.assert_close(inv_freq, expected_freq.float())
    assert factor == pytest.approx(expected_factor)


def test_unknown_scaling_type_is_a_clear_error():
    with pytest.raises(ValueError, match="rope_scaling type 'longrope'"):
        rope_frequencies(64, 10000.0, {"rope_type": "longrope", "factor": 2.0}, 4096)
