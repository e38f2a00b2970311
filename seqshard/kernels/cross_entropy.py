"""Fused linear + cross-entropy that never materializes the ``[tokens, vocab]`` logits.

Tokens are processed in chunks: each chunk's logits are computed, turned into its loss and, in
the same pass, into the gradients of the hidden states and the weight (softmax minus one-hot),
then dropped (the Liger-Kernel approach). Peak extra memory is one ``[chunk, vocab]`` block
instead of the full logits plus their gradient. The backward pass only scales the saved
gradients. This torch form is the reference and what CPU training uses.
"""
from __future__ import annotations

import torch


def _chunk_size(vocab: int, budget_bytes: int = 64 * 2**20) -> int:
    return max(1, budget_bytes // (4 * max(1, vocab)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk):
        tokens = hidden.shape[0]
        valid = labels != ignore_index
        count = int(valid.sum())
        denom = max(count, 1) if reduction == "mean" else 1
        need_grad = hidden.requires_grad or weight.requires_grad
        d_hidden = torch.zeros_like(hidden, dtype=torch.float32) if need_grad else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.float()
        for start in range(0, tokens, chunk):
            end = min(tokens, start + chunk)
            h = hidden[start:end].float()
            logits = h @ w.t()  # [chunk, vocab]
            lab, ok = labels[start:end], valid[start:end]
            lse = torch.logsumexp(logits, dim=-1)
            safe = torch.where(ok, lab, torch.zeros_like(lab))
            target = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            loss += ((lse - target) * ok).sum()
            if need_grad:  # d loss / d logits = softmax - onehot, zero on ignored rows
                grad = torch.softmax(logits, dim=-1)
                grad[torch.arange(end - start, device=grad.device), safe] -= 1
                grad *= ok.unsqueeze(1) / denom
                d_hidden[start:end] = grad @ w
                d_weight += grad.t() @ h
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss / denom

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        return ((d_hidden * grad_loss).to(ctx.dtypes[0]), (d_weight * grad_loss).to(ctx.dtypes[1]),
                None, None, None, None)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum", chunk_size=None):
    """``cross_entropy(hidden @ weight.T, labels)`` with ``reduction`` sum or mean, chunked.
    hidden ``[T, D]``, weight ``[V, D]``, labels ``[T]`` (``ignore_index`` rows carry no loss)."""
    assert reduction in ("sum", "mean"), reduction
    chunk = chunk_size or _chunk_size(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, chunk)
