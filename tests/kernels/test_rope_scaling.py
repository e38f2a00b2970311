"""Scaled RoPE (``inv_freq``): Triton == reference forward and backward; linear scaling equals
dividing positions by the factor; llama3 scaling keeps high and divides low frequencies."""
import math

import torch

from seqshard.kernels import apply_rope
from seqshard.kernels.rope import apply_rope_reference, scaled_inv_freq


def test_scaled_rope_triton_matches_reference(force_triton):
    gen = torch.Generator().manual_seed(3)
    positions = torch.cat([torch.arange(11), torch.arange(4)])
    inv = scaled_inv_freq(32, 5e5, "llama3", 8.0, 1.0, 4.0, 16)
    x = torch.randn(15, 2, 32, generator=gen, requires_grad=True)
    dout = torch.randn(15, 2, 32, generator=gen)
    ref = apply_rope_reference(x, positions, inv_freq=inv)
    (gref,) = torch.autograd.grad(ref, x, dout)
    out = apply_rope(x, positions, inv_freq=inv)
    (g,) = torch.autograd.grad(out, x, dout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, gref, rtol=1e-5, atol=1e-5)


def test_linear_and_llama3_frequencies(force_reference):
    base = scaled_inv_freq(16, 1e4)
    torch.testing.assert_close(scaled_inv_freq(16, 1e4, "linear", 4.0), base / 4)
    x, positions = torch.randn(8, 1, 16), torch.arange(8) * 4
    torch.testing.assert_close(apply_rope(x, positions, inv_freq=base / 4), apply_rope(x, positions // 4))
    inv = scaled_inv_freq(64, 5e5, "llama3", 8.0, 1.0, 4.0, 64)
    base = scaled_inv_freq(64, 5e5)
    wavelen = 2 * torch.pi / base
    assert torch.equal(inv[wavelen < 16], base[wavelen < 16])  # short wavelengths kept
    torch.testing.assert_close(inv[wavelen > 64], base[wavelen > 64] / 8)  # long ones / factor


def test_amplitude_triton_matches_reference(force_triton):
    """YaRN / LongRoPE scale cos and sin: Triton forward and backward keep the amplitude."""
    from types import SimpleNamespace

    from seqshard.kernels.rope_scaling import rope_frequencies

    yarn = SimpleNamespace(type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=0.0,
                           beta_fast=32.0, beta_slow=1.0, mscale=0.0, mscale_all_dim=0.0, truncate=True)
    inv, scale = rope_frequencies(32, 1e4, yarn)
    assert abs(scale - (0.1 * math.log(4.0) + 1)) < 1e-12
    gen = torch.Generator().manual_seed(4)
    positions = torch.cat([torch.arange(40), torch.arange(9)])
    x = torch.randn(49, 2, 32, generator=gen, requires_grad=True)
    dout = torch.randn(49, 2, 32, generator=gen)
    ref = apply_rope_reference(x, positions, inv_freq=inv, scale=scale)
    (gref,) = torch.autograd.grad(ref, x, dout)
    out = apply_rope(x, positions, inv_freq=inv, scale=scale)
    (g,) = torch.autograd.grad(out, x, dout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, gref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.norm(dim=-1), x.detach().norm(dim=-1) * scale)  # a scaled rotation
