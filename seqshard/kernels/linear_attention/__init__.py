"""Causal linear attention with the flash-linear-attention layout (DESIGN.md contract).

``linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
cu_seqlens=None) -> (o, final_state)``: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, optional
per-token per-head log decay g ``[B, T, H]``, states ``[B or N, H, K, V]``, scale ``K ** -0.5``
by default; with ``cu_seqlens`` B is 1 and the N documents are independent (state reset at each
start), ``initial_state`` / ``final_state`` holding one state per document. Zero-length
documents (repeated ``cu_seqlens`` entries) and ``T = 0`` are accepted on every path: an empty
document's final state is its initial state (zeros without one).

Dispatch (``..dispatch.use_triton``): on CUDA tensors, or with ``SEQSHARD_KERNELS=triton``, the
Triton kernel of ``triton_chunk.py`` runs (forward and backward, native varlen: no Python loop
over documents). Otherwise, or when ``impl`` is given explicitly, the torch reference runs: the
chunked form ``chunk.py`` by default, ``naive.py`` its per-token twin (a Python loop over the
``cu_seqlens`` documents).
"""
from __future__ import annotations

import torch

from ..dispatch import use_triton
from .chunk import chunk_linear_attention
from .naive import naive_linear_attention


def linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, impl=None):
    """-> (o like q ``[B, T, H, V]``, fp32 final state or None); ``impl`` picks a torch reference."""
    if impl is None and use_triton(q):
        from .triton_chunk import triton_linear_attention

        return triton_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    impl = chunk_linear_attention if impl is None else impl
    if cu_seqlens is None:
        return impl(q, k, v, g, scale, initial_state, output_final_state)
    assert q.shape[0] == 1, f"with cu_seqlens the batch must be 1, got {q.shape[0]}"
    bounds = cu_seqlens.tolist()
    lens = [e - a for a, e in zip(bounds[:-1], bounds[1:])]
    # split once: per-document slices would each get a full-size zero gradient in backward
    docs = [x[:, bounds[0]:bounds[-1]].split(lens, dim=1) for x in (q, k, v)]
    g_docs = [None] * len(lens) if g is None else g[:, bounds[0]:bounds[-1]].split(lens, dim=1)
    inits = [None] * len(lens) if initial_state is None else initial_state.split(1)
    outs, states = [], []
    for qd, kd, vd, gd, init in zip(*docs, g_docs, inits):
        o, s = impl(qd, kd, vd, gd, scale, init, True)
        outs.append(o)
        states.append(s)
    if not outs:  # no document at all (``cu_seqlens == [0]``)
        h, dk, dv = q.shape[2], q.shape[3], v.shape[-1]
        empty = v[:, :0].to(q.dtype)  # [1, 0, H, V], on the autograd graph like a kernel's output
        return empty, (q.new_zeros(0, h, dk, dv, dtype=torch.float32) if output_final_state else None)
    return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)


__all__ = ["linear_attention", "chunk_linear_attention", "naive_linear_attention"]
