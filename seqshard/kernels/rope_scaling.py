"""RoPE frequency scaling: the inverse frequencies ``[head_dim/2]`` (fp64) and the cos/sin amplitude.

The types and their parameters are those Hugging Face transformers ships for the Llama family
(``rope_parameters``), with the same formulas, so an imported checkpoint reproduces its logits:

- ``none``: ``theta ** (-2i/d)``;
- ``linear``: every frequency / ``factor`` (position interpolation, Chen et al., 2023);
- ``dynamic``: NTK-aware base ``theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))`` with
  ``L = max(seq_len, L0)``, ``L0 = original_max_position_embeddings`` (transformers'
  ``max_position_embeddings``). transformers recomputes it from the longest position of each call;
  seqshard trains at a fixed length, so ``seq_len`` is the training row length
  (``data.max_seq_len``): the frequencies transformers uses on a ``[batch, seq_len]`` batch;
- ``yarn`` (Peng et al., 2023): per dimension a ramp between interpolation (/ factor) and
  extrapolation, between the dimensions that turn ``beta_fast`` and ``beta_slow`` times over
  ``L0`` (floored / ceiled unless ``truncate`` is false); amplitude ``attention_factor``, by default
  ``0.1 ln(factor) + 1`` (or the ``mscale`` / ``mscale_all_dim`` ratio);
- ``llama3``: wavelengths above ``L0 / low_freq_factor`` / factor, below ``L0 / high_freq_factor``
  kept, a linear ramp in ``L0 / wavelength`` between (Llama 3.1);
- ``longrope`` (Ding et al., 2024): frequency ``i`` / ``long_factor[i]`` when ``seq_len > L0``, else
  / ``short_factor[i]``; amplitude ``attention_factor``, by default ``sqrt(1 + ln(factor) / ln(L0))``.

The amplitude multiplies cos and sin (so q.k by its square), as transformers does.
``scaling`` is any object with the attributes of ``seqshard.models.config.RopeScalingConfig``.
"""
from __future__ import annotations

import math

import torch

TYPES = ("none", "linear", "dynamic", "yarn", "llama3", "longrope")


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (its Eq. 21): ``0.1 mscale ln(scale) + 1``; 1 when not scaling."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s) -> float:
    if s.attention_factor:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def _yarn(head_dim, theta, s):
    inv = base_inv_freq(head_dim, theta)
    orig = s.original_max_position_embeddings

    def dim_turning(rotations):  # the dimension whose wavelength fits `rotations` times in orig
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(s.beta_fast or 32), dim_turning(s.beta_slow or 1)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    # ramp 0: high frequencies extrapolate (kept); ramp 1: low frequencies interpolate (/ factor)
    return inv / s.factor * ramp + inv * (1 - ramp), yarn_attention_factor(s)


def _llama3(head_dim, theta, s):
    inv = base_inv_freq(head_dim, theta)
    orig = s.original_max_position_embeddings
    wavelen = 2 * torch.pi / inv
    low_wavelen, high_wavelen = orig / s.low_freq_factor, orig / s.high_freq_factor
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    ramp = (1 - smooth) * inv / s.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(medium, ramp, out), 1.0


def _dynamic(head_dim, theta, s):
    orig = s.original_max_position_embeddings
    length = max(s.seq_len, orig)
    base = theta * (s.factor * length / orig - (s.factor - 1)) ** (head_dim / (head_dim - 2))
    return base_inv_freq(head_dim, base), 1.0


def _longrope(head_dim, theta, s):
    orig = s.original_max_position_embeddings
    ext = s.long_factor if s.seq_len > orig else s.short_factor
    inv = base_inv_freq(head_dim, theta) / torch.tensor(ext, dtype=torch.float64)
    if s.attention_factor:
        return inv, s.attention_factor
    return inv, 1.0 if s.factor <= 1 else math.sqrt(1 + math.log(s.factor) / math.log(orig))


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim/2] fp64, amplitude)`` of RoPE with ``scaling`` (None: plain RoPE)."""
    kind = getattr(scaling, "type", "none")
    if kind == "none":
        return base_inv_freq(head_dim, theta), 1.0
    if kind == "linear":
        return base_inv_freq(head_dim, theta) / scaling.factor, 1.0
    build = {"dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3, "longrope": _longrope}.get(kind)
    assert build is not None, f"unknown RoPE scaling {kind!r} (known: {', '.join(TYPES)})"
    return build(head_dim, theta, scaling)
