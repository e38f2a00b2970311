"""Rotary position embedding (Su et al., 2021), Llama's half-split convention, varlen positions.

``x`` is ``[tokens, heads, head_dim]`` and ``positions`` ``[tokens]`` holds each token's position
inside its own document (restarting at 0 per document), so packing needs no special case.
Torch reference, a lean torch autograd function, Triton forward + backward (the backward is the
rotation by minus the angle), dispatch.

Off Triton, :class:`_RopeTorch` runs the reference's forward ops (the same values) and keeps only
cos and sin (``[T, D/2]``) for backward, which it computes as that inverse rotation written into
one output buffer; autograd on the reference keeps nothing big either, but its backward allocates
about five ``x``-sized temporaries (the products, the concatenation's slices and their sum).
"""
from __future__ import annotations

import torch

from .dispatch import use_reference, use_triton


def rope_cos_sin(positions, head_dim, theta=10000.0, inv_freq=None, scale=1.0):
    """``inv_freq`` ``[head_dim/2]`` replaces ``theta ** (-2i/d)`` (scaled RoPE, see
    :mod:`.rope_scaling`); ``scale`` multiplies cos and sin (YaRN / LongRoPE attention factor)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                                 dtype=torch.float64) / head_dim))
    else:
        inv_freq = inv_freq.to(device=positions.device, dtype=torch.float64)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [T, D/2]
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def scaled_inv_freq(head_dim, theta, kind="none", factor=1.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192):
    """Inverse frequencies ``[head_dim/2]`` (fp64) of ``none``, ``linear`` or ``llama3`` scaling
    (the amplitude-free types; every type: :func:`~seqshard.kernels.rope_scaling.rope_frequencies`)."""
    from types import SimpleNamespace

    from .rope_scaling import rope_frequencies

    assert kind in ("none", "linear", "llama3"), f"{kind!r}: use rope_scaling.rope_frequencies"
    return rope_frequencies(head_dim, theta, SimpleNamespace(
        type=kind, factor=factor, low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
        original_max_position_embeddings=original_max_position_embeddings))[0]


def apply_rope_reference(x, positions, theta=10000.0, inv_freq=None, scale=1.0):
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, inv_freq, scale)
    return _rotate(x, cos.unsqueeze(1), sin.unsqueeze(1))  # cos, sin: [T, 1, D/2]


def _rotate(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class _RopeTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):  # the rotation by minus the angle: [g1 cos + g2 sin, g2 cos - g1 sin]
        cos, sin = ctx.saved_tensors
        g1, g2 = dy.float().chunk(2, dim=-1)
        dx = torch.empty(dy.shape, dtype=torch.float32, device=dy.device)
        d1, d2 = dx.chunk(2, dim=-1)
        torch.mul(g1, cos, out=d1).addcmul_(g2, sin)
        torch.mul(g2, cos, out=d2).addcmul_(g1, sin, value=-1.0)
        return dx.to(dy.dtype), None, None


def apply_rope(x, positions, theta=10000.0, inv_freq=None, scale=1.0):
    """Rotate ``x`` ``[T, H, D]`` by its ``positions``; ``inv_freq`` ``[D/2]`` overrides theta;
    ``scale`` multiplies the result (cos and sin), as YaRN's attention factor does."""
    if use_triton(x):
        from .triton_rows import _Rope

        return _Rope.apply(x, positions, theta, inv_freq, scale)
    if use_reference() or not (torch.is_grad_enabled() and x.requires_grad):
        return apply_rope_reference(x, positions, theta, inv_freq, scale)
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, inv_freq, scale)
    return _RopeTorch.apply(x, cos.unsqueeze(1), sin.unsqueeze(1))
