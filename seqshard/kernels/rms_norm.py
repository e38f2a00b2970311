"""RMSNorm ``y = x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich, 2019): torch reference,
Triton forward + backward (one program per row, weight gradient from per-row partials), dispatch."""
from __future__ import annotations

import torch

from .dispatch import use_triton


def rms_norm_reference(x, weight, eps=1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(x, weight, eps=1e-6):
    if use_triton(x):
        from .triton_rows import _RMSNorm

        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
