"""Triton RMSNorm and RoPE == their torch references (interpreter), forward and backward."""
import pytest
import torch

from seqshard.kernels import apply_rope, rms_norm
from seqshard.kernels.rms_norm import rms_norm_reference
from seqshard.kernels.rope import apply_rope_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def close(name, a, b, dtype):
    err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)
    assert err <= TOL[dtype], f"{name} ({dtype}): rel err {err:.2e}"


def grads(fn, inputs, dout):
    ins = [t.clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    out.backward(dout)
    return out.detach(), [t.grad for t in ins]


def rms_norm_case(seed, shape, dtype):
    """x, weight, (out, grads) of ``rms_norm`` as dispatched, (out, grads) of the reference."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    dout = torch.randn(*shape, generator=gen).to(dtype)
    return x, w, grads(rms_norm, (x, w), dout), grads(rms_norm_reference, (x, w), dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 48), (1, 128)])
def test_rms_norm_triton_matches_reference(force_triton, dtype, shape):
    x, w, (out, g), (ref_out, ref_g) = rms_norm_case(0, shape, dtype)
    close("rms_norm out", out, ref_out, dtype)
    close("rms_norm dx", g[0], ref_g[0], dtype)
    close("rms_norm dweight", g[1], ref_g[1], dtype)


def test_rms_norm_reference_matches_formula(force_reference):
    x, w = torch.randn(4, 8), torch.randn(8)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_triton_matches_reference_with_restarting_positions(force_triton, dtype, head_dim):
    gen = torch.Generator().manual_seed(1)
    positions = torch.cat([torch.arange(1), torch.arange(9), torch.arange(5)])  # documents of 1, 9, 5
    x = torch.randn(15, 3, head_dim, generator=gen).to(dtype)
    dout = torch.randn(15, 3, head_dim, generator=gen).to(dtype)
    ref_out, ref_g = grads(lambda t: apply_rope_reference(t, positions), (x,), dout)
    out, g = grads(lambda t: apply_rope(t, positions), (x,), dout)
    close("rope out", out, ref_out, dtype)
    close("rope dx", g[0], ref_g[0], dtype)


def test_rope_reference_is_a_rotation_restarting_per_document(force_reference):
    x = torch.randn(6, 2, 8)
    positions = torch.tensor([0, 1, 2, 0, 1, 2])
    y = apply_rope(x, positions)
    torch.testing.assert_close(y[0], x[0])  # position 0 is the identity
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm
    torch.testing.assert_close(apply_rope(x[3:], positions[:3]), y[3:])  # same positions, same rotation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 48), (0, 32)])
def test_lean_torch_rms_norm_matches_reference(dtype, shape):
    """The CPU path (``_RMSNormTorch``): the reference's forward values bit for bit, its gradients
    to rounding, and only x and rstd kept for backward."""
    x, w, (out, g), (ref_out, ref_g) = rms_norm_case(2, shape, dtype)
    assert torch.equal(out, ref_out)
    if x.numel():
        close("rms_norm dx", g[0], ref_g[0], dtype)
        close("rms_norm dweight", g[1], ref_g[1], dtype)
    xs = x.clone().requires_grad_()
    y = rms_norm(xs, w.clone().requires_grad_())
    assert type(y.grad_fn).__name__ == "_RMSNormTorchBackward"
    kept = [t for t in y.grad_fn.saved_tensors if t.numel() >= x.numel()]
    assert len(kept) == 1 or not x.numel(), "only x itself is row-sized among the saved tensors"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_torch_rope_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    positions = torch.cat([torch.arange(4), torch.arange(7)])
    x = torch.randn(11, 3, 32, generator=gen).to(dtype)
    dout = torch.randn(11, 3, 32, generator=gen).to(dtype)
    for scale, theta in ((1.0, 10000.0), (1.3, 5e5)):
        ref_out, ref_g = grads(lambda t: apply_rope_reference(t, positions, theta, None, scale), (x,), dout)
        out, g = grads(lambda t: apply_rope(t, positions, theta, None, scale), (x,), dout)
        assert torch.equal(out, ref_out)
        close("rope dx", g[0], ref_g[0], dtype)
    y = apply_rope(x.clone().requires_grad_(), positions)
    assert type(y.grad_fn).__name__ == "_RopeTorchBackward"
    assert all(t.numel() < x.numel() for t in y.grad_fn.saved_tensors), "only cos and sin are kept"
