"""Rotary position embeddings (RoPE) and the context-extension variants.

RoPE rotates each pair of query/key channels by an angle proportional to the
token's position, so attention scores depend on relative distance. Only the
per-channel frequencies (``inv_freq``) differ between the scaling types; the
rotation itself is the same. ``rope_scaling`` in config.json picks the type.
"""

import math

import torch


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq [head_dim // 2], attention_factor)`` for a config.

    ``attention_factor`` multiplies cos and sin (YaRN uses it to keep the
    softmax temperature steady on long contexts); it is 1.0 otherwise.
    """
    # Always on the CPU (the caller moves them): under a meta-device model build, this arithmetic
    # would go through torch's reference ops, whose first use imports torch._dynamo (~1.5 s).
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        # Positions are squeezed by `factor`: the same as dividing every frequency.
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, factor, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(head_dim, theta, factor, scaling, max_positions)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported; use default, linear, llama3 or yarn")


def _llama3_frequencies(inv_freq: torch.Tensor, factor: float, scaling: dict) -> torch.Tensor:
    """Llama 3: slow (long-wavelength) channels are interpolated, fast ones kept, a smooth blend between."""
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / scaling["low_freq_factor"]
    high_freq_wavelen = old_context / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, blended, scaled)


def _yarn_frequencies(head_dim: int, theta: float, factor: float, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate slow channels, extrapolate fast ones, ramp linearly between them."""
    old_context = scaling.get("original_max_position_embeddings") or max_positions / factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The channel index whose wavelength completes `rotations` turns over the old context.
        return head_dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    base_freq = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolated, interpolated = 1.0 / base_freq, 1.0 / (factor * base_freq)
    keep = 1 - ramp  # 1 for fast channels (kept as trained), 0 for slow ones (interpolated)
    return interpolated * (1 - keep) + extrapolated * keep, float(attention_factor)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [tokens, heads, head_dim]`` by per-token angles.

    Channel ``i`` of the first half pairs with channel ``i`` of the second:
    ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``. With ``cos = [cos, cos]``
    and ``signed_sin = [-sin, sin]`` (``[tokens, head_dim]``, made once per
    forward), that is ``x * cos + swap_halves(x) * signed_sin``: the halves
    swapped by one concatenation (the usual ``rotate_half`` spelling, a negation
    and a concatenation, costs two; ``roll`` costs one too, but on a prompt
    chunk's heads its kernel took an H100 2.2 times as long), and ``addcmul``
    multiplies and adds in one.
    """
    half = x.shape[-1] // 2
    cos, signed_sin = cos[:, None, :], signed_sin[:, None, :]
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), signed_sin)
