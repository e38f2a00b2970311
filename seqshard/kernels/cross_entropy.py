"""Fused linear + cross-entropy that never materializes the ``[tokens, vocab]`` logits.

Tokens are processed in chunks: each chunk's logits are computed, turned into its loss and, in
the same pass, into the gradients of the hidden states and the weight (softmax minus one-hot),
then dropped (the Liger-Kernel approach). Peak extra memory is one ``[chunk, vocab]`` block
instead of the full logits plus their gradient. The backward pass only scales the saved
gradients. This torch form is the reference and what CPU training uses. Optional per-token
weights (per-source ``loss_weight``) scale each row's loss and its gradient rows; the per-row
cross-entropy can be written out for per-source metrics.

On CUDA tensors (or with ``SEQSHARD_KERNELS=triton``) the per-chunk softmax step is the Triton
kernel ``_ce_rows``: one program per token row streams the vocabulary twice (online max and
sum of exponentials, then ``softmax - onehot`` written over the logits in place), so no second
``[chunk, vocab]`` buffer is allocated; the two matmuls stay with cuBLAS.
"""
from __future__ import annotations

import torch

from .dispatch import use_triton


def _softmax_step_triton(logits, labels, ignore_index, grad_scale, need_grad):
    """Triton (``triton_rows._ce_rows``): per-row losses ``[n]``; ``logits`` (fp32, contiguous)
    is overwritten by its gradient."""
    from .triton_rows import softmax_step_triton

    return softmax_step_triton(logits, labels, ignore_index, grad_scale, need_grad)


def _softmax_step_reference(logits, labels, ignore_index, grad_scale, need_grad):
    """torch: per-row losses ``[n]``; ``logits`` is overwritten by its gradient when asked."""
    ok = labels != ignore_index
    safe = torch.where(ok, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1)) * ok
    if need_grad:  # d loss / d logits = softmax - onehot, zero on ignored rows
        logits.sub_(lse.unsqueeze(1)).exp_()
        logits[torch.arange(logits.shape[0], device=logits.device), safe] -= 1
        logits.mul_((ok * grad_scale).unsqueeze(1))
    return loss


def _chunk_size(vocab: int, budget_bytes: int = 64 * 2**20) -> int:
    return max(1, budget_bytes // (4 * max(1, vocab)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk, bias=None, logit_scale=1.0,
                softcap=0.0, token_weights=None, token_losses=None):
        tokens = hidden.shape[0]
        ok = labels != ignore_index
        if token_weights is None:
            count = int(ok.sum())
            denom = max(count, 1) if reduction == "mean" else 1
        else:  # weighted: sum_t w_t ce_t (mean: divided by sum_t w_t over the loss tokens)
            token_weights = token_weights.to(device=hidden.device, dtype=torch.float32)
            total = float((token_weights * ok).sum())
            denom = (total if total > 0 else 1.0) if reduction == "mean" else 1
        need_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        d_hidden = torch.zeros_like(hidden, dtype=torch.float32) if need_grad else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if need_grad and bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.float()
        step = _softmax_step_triton if use_triton(hidden) else _softmax_step_reference
        for start in range(0, tokens, chunk):
            end = min(tokens, start + chunk)
            h = hidden[start:end].float()
            logits = h @ w.t()  # [chunk, vocab], becomes d loss / d logits in place
            if bias is not None:
                logits += bias.float()
            if logit_scale != 1.0:
                logits *= logit_scale
            tanh = None
            if softcap:  # logits -> softcap * tanh(logits / softcap); keep tanh for its derivative
                tanh = torch.tanh(logits / softcap)
                logits = tanh * softcap
            rows = step(logits, labels[start:end], ignore_index, 1.0 / denom, need_grad)  # [chunk], 0 if ignored
            if token_losses is not None:
                token_losses[start:end] = rows.detach()
            if token_weights is None:
                loss += rows.sum()
            else:
                loss += (rows * token_weights[start:end]).sum()
                if need_grad:  # each row's gradient scaled by its token's weight
                    logits *= token_weights[start:end].unsqueeze(1)
            if need_grad:
                if tanh is not None:
                    logits *= 1.0 - tanh * tanh
                if logit_scale != 1.0:
                    logits *= logit_scale
                d_hidden[start:end] = logits @ w
                d_weight += logits.t() @ h
                if d_bias is not None:
                    d_bias += logits.sum(0)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss / denom

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        d_bias = None if d_bias is None else (d_bias * grad_loss).to(ctx.dtypes[2])
        return ((d_hidden * grad_loss).to(ctx.dtypes[0]), (d_weight * grad_loss).to(ctx.dtypes[1]),
                None, None, None, None, d_bias, None, None, None, None)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum", chunk_size=None, bias=None,
                         logit_scale=1.0, softcap=0.0, token_weights=None, token_losses=None):
    """``cross_entropy(cap(logit_scale * (hidden @ weight.T + bias)), labels)`` with ``reduction``
    sum or mean, chunked; ``cap(z) = softcap * tanh(z / softcap)`` when ``softcap > 0`` (Gemma's
    final logits), the identity otherwise. hidden ``[T, D]``, weight ``[V, D]``, bias ``[V]`` or
    None, labels ``[T]`` (``ignore_index`` rows carry no loss).

    ``token_weights`` ``[T]`` (float, None = all 1): the loss is ``sum_t w_t ce_t`` (``mean``:
    divided by ``sum_t w_t`` over the rows that carry loss) and each row's gradient is scaled by
    ``w_t``; no weights runs the unweighted code unchanged. ``token_losses``: a ``[T]`` fp32 tensor
    the unweighted per-row cross-entropy is written into (0 on ignored rows; no gradient)."""
    assert reduction in ("sum", "mean"), reduction
    chunk = chunk_size or _chunk_size(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, chunk, bias,
                                     float(logit_scale), float(softcap or 0.0), token_weights, token_losses)
