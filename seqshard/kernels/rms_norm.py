"""RMSNorm ``y = x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich, 2019): torch reference,
Triton forward + backward (one program per row, weight gradient from per-row partials), dispatch."""
from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, use_triton


def rms_norm_reference(x, weight, eps=1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

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


def rms_norm(x, weight, eps=1e-6):
    if use_triton(x):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
