"""RMSNorm ``y = x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich, 2019): torch reference,
a lean torch autograd function, Triton forward + backward (one program per row, weight gradient
from per-row partials), dispatch.

Off Triton, :class:`_RMSNormTorch` runs the reference's forward ops (the same values, bit for
bit) but keeps only ``x`` and the per-row ``rstd`` for backward, and computes the analytic
gradient with one row-sized temporary besides ``dx``. Autograd on the reference keeps the
normalised rows as well and its backward materialises about six ``x``-sized temporaries (pow,
mean and rsqrt backward); under activation checkpointing those sit in every layer's recompute.
"""
from __future__ import annotations

import torch

from .dispatch import use_reference, use_triton


def rms_norm_reference(x, weight, eps=1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class _RMSNormTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        # y = xhat * w, xhat = x * rstd:  dw = sum_rows(dy * xhat),
        # dx = rstd * (dy * w - xhat * mean(dy * w * xhat)) = rstd * (dy * w - x * rstd * mean(...))
        x, weight, rstd = ctx.saved_tensors
        w, xf, g = weight.float(), x.float(), dy.float()
        prod = (g * xf).mul_(rstd)  # dy * xhat: the one temporary besides dx
        dw = prod.reshape(-1, prod.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        coef = (prod @ w).unsqueeze(-1).div_(x.shape[-1]).mul_(rstd)  # rstd * mean(dy * w * xhat), [.., 1]
        del prod
        dx = (g * w).addcmul_(xf, coef, value=-1.0).mul_(rstd)
        return dx.to(x.dtype), None if dw is None else dw.to(weight.dtype), None


def rms_norm(x, weight, eps=1e-6):
    if use_triton(x):
        from .triton_rows import _RMSNorm

        return _RMSNorm.apply(x, weight, eps)
    if use_reference() or not torch.is_grad_enabled():
        return rms_norm_reference(x, weight, eps)
    return _RMSNormTorch.apply(x, weight, eps)
