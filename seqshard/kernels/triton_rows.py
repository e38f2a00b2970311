"""The row-wise Triton kernels (RMSNorm, RoPE, the fused loss's softmax step), imported on first
use by ``rms_norm.py``, ``rope.py`` and ``cross_entropy.py`` (through ``dispatch.use_triton``), so a
CPU run never imports Triton (about 70 MB of RSS per process)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope import rope_cos_sin


@triton.jit
def _rms_fwd(X, W, Y, RSTD, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, x * rstd * w, mask=mask)
    tl.store(RSTD + row, rstd)

@triton.jit
def _rms_bwd(DY, X, W, RSTD, DX, DW_ROWS, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xhat = x * rstd
    wdy = w * dy
    c = tl.sum(xhat * wdy, axis=0) / n_cols
    tl.store(DX + row * n_cols + cols, (wdy - xhat * c) * rstd, mask=mask)
    tl.store(DW_ROWS + row * n_cols + cols, dy * xhat, mask=mask)

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, n = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        if x2.shape[0]:  # T = 0: nothing to launch
            _rms_fwd[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, n, eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.block = shape, block
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[-1]
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        dw_rows = torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
        if x2.shape[0]:
            _rms_bwd[(x2.shape[0],)](dy2, x2, weight.contiguous(), rstd, dx, dw_rows, n, BLOCK=ctx.block)
        return dx.view(ctx.shape), dw_rows.sum(0).to(weight.dtype), None



@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_heads, half, sign, BLOCK: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    base = (token * n_heads + head) * 2 * half
    x1 = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + half + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + token * half + cols, mask=mask, other=0.0)
    s = tl.load(SIN + token * half + cols, mask=mask, other=0.0) * sign
    tl.store(Y + base + cols, x1 * c - x2 * s, mask=mask)
    tl.store(Y + base + half + cols, x2 * c + x1 * s, mask=mask)

def _rotate(x, cos, sin, sign):
    x = x.contiguous()
    y = torch.empty_like(x)
    t, h, d = x.shape
    if t:
        _rope_kernel[(t, h)](x, cos, sin, y, h, d // 2, sign, BLOCK=triton.next_power_of_2(d // 2))
    return y

class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, theta, inv_freq, scale):
        cos, sin = rope_cos_sin(positions, x.shape[-1], theta, inv_freq, scale)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # (scale R)^T = scale R(-angle): the same amplitude, the opposite rotation
        return _rotate(dy, cos, sin, -1.0), None, None, None, None



@triton.jit
def _ce_rows(LOGITS, LABELS, LOSS, stride, n_cols, ignore_index, grad_scale,
             NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row loss ``lse - logit[label]`` (0 on ignored rows); with NEED_GRAD the row becomes
    ``grad_scale * (softmax - onehot)`` (zeros on ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    label = tl.load(LABELS + row)
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(total)
    ok = label != ignore_index
    target = tl.load(ptr + tl.where(ok, label, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(ok, lse - target, 0.0))
    if NEED_GRAD:
        scale = tl.where(ok, grad_scale, 0.0)
        for c0 in range(0, n_cols, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - (cols == label).to(tl.float32)
            tl.store(ptr + cols, grad * scale, mask=cols < n_cols)


def softmax_step_triton(logits, labels, ignore_index, grad_scale, need_grad):
    """Per-row losses ``[n]``; ``logits`` (fp32, contiguous) is overwritten by its gradient."""
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block = min(4096, triton.next_power_of_2(vocab))
        _ce_rows[(n,)](logits, labels.contiguous(), loss, logits.stride(0), vocab, ignore_index,
                       float(grad_scale), NEED_GRAD=need_grad, BLOCK=block)
    return loss
