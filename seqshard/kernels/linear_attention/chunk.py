"""Chunked causal linear attention (the form used by Lightning Attention / flash-linear-attention).

Within a chunk of C tokens with cumulative log decay ``G_t = g_1 + ... + g_t``:
``o_t = scale * (q_t exp(G_t) S_0 + sum_{s<=t} (q_t . k_s) exp(G_t - G_s) v_s)`` (intra-chunk
masked matmul + inter-chunk state), and the state after the chunk is
``S_C = exp(G_C) S_0 + sum_s exp(G_C - G_s) k_s^T v_s``. Same function as ``naive.py``, with
O(T C) instead of O(T) sequential steps.
"""
from __future__ import annotations

import torch


def chunk_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                           chunk_size=64):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]`` -> (o ``[B, T, H, V]``, final state)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    state = q.new_zeros(b, h, dk, dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    # split once (not x[:, start:end] per chunk: each slice's backward would write a zero-filled
    # full-length gradient, O(T^2 / C) in all)
    qs, ks, vs = (x.float().transpose(1, 2).split(chunk_size, dim=2) for x in (q, k, v))  # [B, H, C, .]
    gs = [None] * len(qs) if g is None else g.float().transpose(1, 2).split(chunk_size, dim=2)  # [B, H, C]
    for qc, kc, vc, gc in zip(qs, ks, vs, gs):
        c = qc.shape[2]
        cum = torch.zeros(b, h, c, dtype=torch.float32, device=q.device) if gc is None else gc.cumsum(-1)
        mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        decay = torch.exp((cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~mask, float("-inf")))  # [B,H,C,C]
        scores = (qc @ kc.transpose(-1, -2)) * decay
        o = scores @ vc + (qc * torch.exp(cum).unsqueeze(-1)) @ state
        outs.append(scale * o)
        last = cum[..., -1:]  # [B, H, 1]
        state = state * torch.exp(last).unsqueeze(-1) + (kc * torch.exp(last - cum).unsqueeze(-1)).transpose(-1, -2) @ vc
    o = torch.cat(outs, 2).transpose(1, 2).to(q.dtype) if outs else q.new_zeros(b, 0, h, dv)
    return o, (state if output_final_state else None)
