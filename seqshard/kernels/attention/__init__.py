"""Varlen attention with ``flash_attn_varlen_func`` semantics: public entry points and dispatch.

- Triton (``triton_fa.py``) on CUDA tensors, or anywhere with ``SEQSHARD_KERNELS=triton``;
- PyTorch's CPU flash kernel per document (``flash_cpu.py``, O(T * H * D) memory) on CPU tensors;
- blockwise torch (``blockwise.py``, O(T * H * D) plus a fixed score budget) on any other device
  (``SEQSHARD_KERNELS=blockwise`` forces it anywhere: that is how the tests run it here);
- the dense torch reference (``reference.py``, ``[H, L, L]`` scores per document) only with
  ``SEQSHARD_KERNELS=reference``: it is the test oracle.

Attention patterns (``masks.py``): ``window_size=(left, right)``, ``softcap`` (flash-attn's
names and semantics), ``chunk_size`` (Llama 4) and ``sinks`` (GPT-OSS, one logit per query head).
Sinks work on every path (they are folded into the merged out and lse). The Triton kernels take
windows, chunks and soft-caps natively (skipping tiles outside the window); PyTorch's CPU flash
kernel has none of them, so on CPU those calls run the blockwise path, which also skips the key
blocks outside a window: O(L * W) everywhere. Calls with explicit positions (ring's block pairs)
run blockwise. Nothing is dropped: every path honours every pattern.

- ``attention(...)``: differentiable; ``return_lse=True`` also returns the fp32 lse ``[H, total_q]``.
- ``attention_forward`` / ``attention_backward``: the no-autograd block pair ring attention
  merges and differentiates block by block (backward from the *final* out and lse). With
  ``sinks``, the forward folds them in and the backward also returns their gradient.
  ``q_pos`` / ``k_pos`` (per-token positions in the document) place blocks whose queries and
  keys are not bottom-right aligned (ring attention's block pairs).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from ..dispatch import HAS_TRITON, use_reference, use_triton
from .blockwise import blockwise_attention_backward, blockwise_attention_forward
from .flash_cpu import HAS_CPU_FLASH, flash_cpu_attention_backward, flash_cpu_attention_forward
from .masks import Mask, apply_sinks, make_mask, sinks_grad, without_unreachable_band
from .reference import attention_backward_reference, attention_forward_reference, attention_reference


def _impl(q, mask: Mask | None = None, positioned: bool = False) -> str:
    if use_reference():
        return "reference"
    fancy = positioned or (mask is not None and not mask.plain)
    if use_triton(q):
        return "blockwise" if positioned else "triton"
    if os.environ.get("SEQSHARD_KERNELS") == "blockwise" or fancy:
        return "blockwise"
    return "flash_cpu" if q.device.type == "cpu" and HAS_CPU_FLASH else "blockwise"


def _effective(causal, window_size, chunk_size, softcap, cu_seqlens_q, cu_seqlens_k, q_pos):
    """The call's mask, a window wider than every document dropped (exact: it hides nothing there,
    and the plain kernels are faster), and its flash-attn keywords."""
    mask = make_mask(causal, window_size, chunk_size, softcap)
    if mask.banded and q_pos is None and len(cu_seqlens_k) > 1:
        longest = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max() + (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        mask = without_unreachable_band(mask, longest)
    return mask, (mask.left, mask.right), mask.softcap, mask.chunk or None


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                      causal=False, softmax_scale=None, *, window_size=(-1, -1), softcap=0.0, chunk_size=None,
                      sinks=None, q_pos=None, k_pos=None):
    """One block's ``(out, lse)``; sinks (if any) folded in."""
    mask, window_size, softcap, chunk_size = _effective(causal, window_size, chunk_size, softcap, cu_seqlens_q,
                                                        cu_seqlens_k, q_pos)
    impl = _impl(q, mask, q_pos is not None)
    if impl == "triton":
        from .triton_fa import triton_attention_forward

        out, lse = triton_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, mask)
    elif impl == "flash_cpu":
        out, lse = flash_cpu_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
    elif impl == "blockwise":
        out, lse = blockwise_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                                               window_size, softcap, chunk_size, q_pos, k_pos)
    else:
        out, lse = attention_forward_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               causal, softmax_scale, window_size=window_size, softcap=softcap,
                                               chunk_size=chunk_size, q_pos=q_pos, k_pos=k_pos)
    return apply_sinks(out, lse, sinks) if sinks is not None else (out, lse)


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                       max_seqlen_k=None, causal=False, softmax_scale=None, *, window_size=(-1, -1), softcap=0.0,
                       chunk_size=None, sinks=None, q_pos=None, k_pos=None):
    """``(dq, dk, dv)`` of one block from the final out and lse; ``(dq, dk, dv, dsinks)`` with sinks."""
    mask, window_size, softcap, chunk_size = _effective(causal, window_size, chunk_size, softcap, cu_seqlens_q,
                                                        cu_seqlens_k, q_pos)
    impl = _impl(q, mask, q_pos is not None)
    if impl == "triton":
        from .triton_fa import triton_attention_backward

        grads = triton_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                          softmax_scale, mask)
    elif impl == "flash_cpu":
        grads = flash_cpu_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                             softmax_scale)
    elif impl == "blockwise":
        grads = blockwise_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal,
                                             softmax_scale, window_size, softcap, chunk_size, q_pos, k_pos)
    else:
        grads = attention_backward_reference(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, causal, softmax_scale, window_size, softcap, chunk_size,
                                             q_pos, k_pos)
    return tuple(grads) + (sinks_grad(dout, out, lse, sinks),) if sinks is not None else grads


class _FlashAttention(torch.autograd.Function):
    """Memory-efficient attention (Triton, CPU flash or blockwise, as dispatched): saves q, k, v,
    out and lse (O(T * H * D)); the backward recomputes the scores tile by tile from them."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_q, cu_k, causal, scale, pattern):
        out, lse = attention_forward(q, k, v, cu_q, cu_k, None, None, causal, scale, sinks=sinks, **pattern)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks)
        ctx.causal, ctx.scale, ctx.pattern = causal, scale, pattern
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        return _saved_backward(ctx, dout) + (None,) * 5


def _saved_backward(ctx, dout):
    """dq, dk, dv, dsinks from the ``(q, k, v, out, lse, cu_q, cu_k, sinks)`` a forward saved."""
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    grads = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, None, None, ctx.causal, ctx.scale,
                               sinks=sinks, **ctx.pattern)
    return grads[0], grads[1], grads[2], (grads[3] if sinks is not None else None)


class _StashedAttention(torch.autograd.Function):
    """The recomputation of an attention call whose ``out`` and ``lse`` were kept from the first
    forward (``activation_checkpointing: lean``): no kernel runs; q, k, v (recomputed) and the kept
    out, lse are saved for the usual backward."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_q, cu_k, causal, scale, pattern, kept):
        out, lse = kept
        # the same tensors, in the same order, as _FlashAttention saves: the checkpoint matches them
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks)
        ctx.causal, ctx.scale, ctx.pattern = causal, scale, pattern
        ctx.mark_non_differentiable(lse)
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, _dlse):
        return _saved_backward(ctx, dout) + (None,) * 6


class KernelStash:
    """Out and lse of each ``attention()`` call in one checkpointed block, kept between its first
    forward (``recording``) and its recomputation in backward (``replaying``), so that the
    recomputation runs everything but the O(L^2) kernel (``train.activation_checkpointing: lean``).
    Calls that do not go through ``attention()`` (ring's block pairs) are simply recomputed."""

    active = None  # the stash of the block being run, or None

    def __init__(self):
        self.kept, self.mode = [], None

    def _run(self, mode):
        @contextmanager
        def ctx():
            outer, KernelStash.active = KernelStash.active, self
            self.mode = mode
            if mode == "record":
                self.kept = []
            try:
                yield
            finally:
                KernelStash.active, self.mode = outer, None
        return ctx()

    def recording(self):
        return self._run("record")

    def replaying(self):
        return self._run("replay")


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, softmax_scale=None, return_lse=False, window_size=(-1, -1), softcap=0.0,
              chunk_size=None, sinks=None, q_pos=None, k_pos=None):
    """``flash_attn_varlen_func``-compatible varlen attention (see ``reference.py`` and ``masks.py``);
    ``q_pos`` / ``k_pos`` (int ``[total_q]`` / ``[total_k]``, positions in the document) replace
    the bottom-right alignment where a caller holds queries and keys of different spans."""
    pattern = dict(window_size=tuple(window_size), softcap=softcap, chunk_size=chunk_size, q_pos=q_pos, k_pos=k_pos)
    if _impl(q) == "reference":
        return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
                                   sinks=sinks, **pattern)
    stash = KernelStash.active
    if stash is not None and stash.mode == "replay" and stash.kept:
        out, lse = _StashedAttention.apply(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                                           pattern, stash.kept.pop(0))
    else:
        out, lse = _FlashAttention.apply(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, pattern)
        if stash is not None and stash.mode == "record" and torch.is_grad_enabled():
            stash.kept.append((out.detach(), lse))
    return (out, lse) if return_lse else out


__all__ = ["attention", "KernelStash", "attention_forward", "attention_backward", "attention_reference", "HAS_TRITON"]
