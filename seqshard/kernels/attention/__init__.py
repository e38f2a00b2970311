"""Varlen attention with ``flash_attn_varlen_func`` semantics: public entry points and dispatch.

- Triton (``triton_fa.py``) on CUDA tensors, or anywhere with ``SEQSHARD_KERNELS=triton``;
- PyTorch's CPU flash kernel per document (``flash_cpu.py``, O(T * H * D) memory) on CPU tensors;
- blockwise torch (``blockwise.py``, O(T * H * D) plus a fixed score budget) on any other device
  (``SEQSHARD_KERNELS=blockwise`` forces it anywhere: that is how the tests run it here);
- the dense torch reference (``reference.py``, ``[H, L, L]`` scores per document) only with
  ``SEQSHARD_KERNELS=reference``: it is the test oracle.

- ``attention(...)``: differentiable; ``return_lse=True`` also returns the fp32 lse ``[H, total_q]``.
- ``attention_forward`` / ``attention_backward``: the no-autograd block pair ring attention
  merges and differentiates block by block (backward from the *final* out and lse).
"""
from __future__ import annotations

import os

import torch

from ..dispatch import HAS_TRITON, use_reference, use_triton
from .blockwise import blockwise_attention_backward, blockwise_attention_forward
from .flash_cpu import HAS_CPU_FLASH, flash_cpu_attention_backward, flash_cpu_attention_forward
from .reference import attention_backward_reference, attention_forward_reference, attention_reference


def _impl(q) -> str:
    if use_triton(q):
        return "triton"
    if use_reference():
        return "reference"
    if os.environ.get("SEQSHARD_KERNELS") == "blockwise":
        return "blockwise"
    return "flash_cpu" if q.device.type == "cpu" and HAS_CPU_FLASH else "blockwise"


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                      causal=False, softmax_scale=None):
    impl = _impl(q)
    if impl == "triton":
        from .triton_fa import triton_attention_forward

        return triton_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
    if impl == "flash_cpu":
        return flash_cpu_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
    if impl == "blockwise":
        return blockwise_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
    return attention_forward_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       causal, softmax_scale)


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                       max_seqlen_k=None, causal=False, softmax_scale=None):
    impl = _impl(q)
    if impl == "triton":
        from .triton_fa import triton_attention_backward

        return triton_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
    if impl == "flash_cpu":
        return flash_cpu_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                            softmax_scale)
    if impl == "blockwise":
        return blockwise_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                            softmax_scale)
    return attention_backward_reference(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, causal, softmax_scale)


class _FlashAttention(torch.autograd.Function):
    """Memory-efficient attention (Triton, CPU flash or blockwise, as dispatched): saves q, k, v,
    out and lse (O(T * H * D)); the backward recomputes the scores tile by tile from them."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal, scale):
        out, lse = attention_forward(q, k, v, cu_q, cu_k, None, None, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, None, None, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, softmax_scale=None, return_lse=False):
    """``flash_attn_varlen_func``-compatible varlen attention (see ``reference.py``)."""
    if _impl(q) == "reference":
        return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal=causal, softmax_scale=softmax_scale, return_lse=return_lse)
    out, lse = _FlashAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
    return (out, lse) if return_lse else out


__all__ = ["attention", "attention_forward", "attention_backward", "attention_reference", "HAS_TRITON"]
