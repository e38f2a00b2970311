"""Naive causal linear attention: the per-token recurrence, the ground truth for the chunked form.

``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t`` (states ``[H, K, V]``).
Computes in fp32, or in fp64 when given fp64 inputs (the oracle of the accuracy tests).
"""
from __future__ import annotations

import torch


def naive_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]`` (log decay) -> (o, final_state)."""
    b, t, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32)
    state = (q.new_zeros(b, h, dk, v.shape[-1], dtype=dt) if initial_state is None
             else initial_state.to(dt))
    outs = []
    for i in range(t):
        if g is not None:
            state = state * torch.exp(g[:, i].to(dt))[..., None, None]
        state = state + k[:, i].to(dt).unsqueeze(-1) * v[:, i].to(dt).unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, i].to(dt), state))
    o = torch.stack(outs, 1).to(q.dtype) if outs else v[:, :0].to(q.dtype)
    return o, (state if output_final_state else None)
