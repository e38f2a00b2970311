"""Memory-efficient varlen attention on CPU through PyTorch's own flash kernel.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel behind
``F.scaled_dot_product_attention`` on CPU) computes attention tile by tile with an online softmax
and returns the log-sum-exp; its ``_backward`` recomputes the scores per tile from
``(q, k, v, out, lse)`` (FlashAttention-2, Dao 2023). Neither keeps an ``[L, L]`` tensor, so memory
is O(T * H * D). It is called once per document on strided ``[1, H, L, D]`` views of the packed
``[T, H, D]`` tensors (no copies); GQA is passed through (the kernel reads kv head ``h // group``).

Its causal mask is aligned top-left; ``flash_attn_varlen_func``'s is bottom-right (query j of a
length-Lq document sees keys ``<= j + Lk - Lq``). Each document is therefore cut into pieces the
kernel does natively (``_pieces``):
- ``Lk >= Lq``: keys ``[0, Lk - Lq)`` are seen by every query (a full piece) and keys
  ``[Lk - Lq, Lk)`` form a square causal piece; the two are merged by their lse in fp32.
- ``Lk < Lq``: the first ``Lq - Lk`` queries see no key (out 0, lse ``-inf``, no gradient);
  the last ``Lk`` queries against all keys are a square causal piece.
The backward of each piece uses the document's *final* out and lse (that is also what ring
attention's block backward needs), so the pieces' gradients simply add up.
"""
from __future__ import annotations

import torch

from .blockwise import document_bounds, forward_outputs

try:  # private aten ops (torch >= 2.2); without them dispatch falls back to blockwise.py
    _FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    _BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    HAS_CPU_FLASH = True
except (AttributeError, RuntimeError):
    HAS_CPU_FLASH = False


def _pieces(lq, lk, causal):
    """``[(q0, q1, k0, k1, causal)]``: the kernel calls that make up one document's attention."""
    if lq == 0 or lk == 0:
        return []
    if not causal:
        return [(0, lq, 0, lk, False)]
    off = lk - lq
    if off < 0:  # the first -off queries see nothing
        return [(-off, lq, 0, lk, True)]
    return [(0, lq, off, lk, True)] + ([(0, lq, 0, off, False)] if off else [])


def _heads_first(x):
    """``[L, H, D]`` -> a ``[1, H, L, D]`` view (no copy)."""
    return x.transpose(0, 1).unsqueeze(0)


@torch.no_grad()
def flash_cpu_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None):
    """q ``[Tq, H, D]``, k/v ``[Tk, H_kv, D]`` -> ``(out [Tq, H, D] in q's dtype, lse [H, Tq] fp32)``."""
    n_heads, _, scale, out, lse = forward_outputs(q, k, v, softmax_scale)
    for a, b, c, d in document_bounds(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        for i, (q0, q1, k0, k1, piece_causal) in enumerate(_pieces(b - a, d - c, causal)):
            o, blse = _FWD(_heads_first(q[a + q0:a + q1]), _heads_first(k[c + k0:c + k1]),
                           _heads_first(v[c + k0:c + k1]), 0.0, piece_causal, scale=scale)
            o, blse = o[0].transpose(0, 1), blse[0]  # [Lq, H, D], [H, Lq]
            rows = slice(a + q0, a + q1)
            if i == 0:
                out[rows], lse[:, rows] = o, blse
            else:  # merge with the first piece in fp32 (both pieces cover every row of the document)
                new = torch.logaddexp(lse[:, rows], blse)
                w_old = torch.exp(lse[:, rows] - new).t().unsqueeze(-1)  # [Lq, H, 1]
                w_new = torch.exp(blse - new).t().unsqueeze(-1)
                out[rows] = (out[rows].float() * w_old + o.float() * w_new).to(out.dtype)
                lse[:, rows] = new
    return out, lse


@torch.no_grad()
def flash_cpu_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=False,
                                 softmax_scale=None):
    """Gradients of one attention block given the *final* ``out`` and ``lse`` of its rows (which
    may include other key blocks, as in ring attention). Returns dq, dk, dv in the input dtypes,
    dk/dv in the kv-head shape."""
    head_dim = q.shape[2]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    out = out.to(q.dtype)  # the kernel wants out in q's dtype (ring merges in fp32)
    dout = dout.to(q.dtype)
    docs = document_bounds(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    everything = (0, q.shape[0], 0, k.shape[0])  # every row and every key
    if docs == [everything] and _pieces(q.shape[0], k.shape[0], causal) == [(*everything, causal)]:
        # nothing to accumulate: the kernel's gradients are the answer (as [T, H, D] views),
        # without three fp32 buffers beside them
        gq, gk, gv = _BWD(_heads_first(dout), _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(out),
                          lse.unsqueeze(0), 0.0, causal, scale=scale)
        return gq[0].transpose(0, 1), gk[0].transpose(0, 1), gv[0].transpose(0, 1)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for a, b, c, d in docs:
        for q0, q1, k0, k1, piece_causal in _pieces(b - a, d - c, causal):
            rows, cols = slice(a + q0, a + q1), slice(c + k0, c + k1)
            gq, gk, gv = _BWD(_heads_first(dout[rows]), _heads_first(q[rows]), _heads_first(k[cols]),
                              _heads_first(v[cols]), _heads_first(out[rows]), lse[:, rows].unsqueeze(0),
                              0.0, piece_causal, scale=scale)
            dq[rows] += gq[0].transpose(0, 1)
            dk[cols] += gk[0].transpose(0, 1)
            dv[cols] += gv[0].transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
