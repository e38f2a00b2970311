"""Naive causal linear attention: the per-token recurrence, the ground truth for the chunked form.

``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t`` (states ``[H, K, V]``).
"""
from __future__ import annotations

import torch


def naive_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]`` (log decay) -> (o, final_state)."""
    b, t, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    state = (q.new_zeros(b, h, dk, v.shape[-1], dtype=torch.float32) if initial_state is None
             else initial_state.float())
    outs = []
    for i in range(t):
        if g is not None:
            state = state * torch.exp(g[:, i].float())[..., None, None]
        state = state + k[:, i].float().unsqueeze(-1) * v[:, i].float().unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, i].float(), state))
    o = torch.stack(outs, 1).to(q.dtype) if outs else q.new_zeros(b, 0, h, v.shape[-1])
    return o, (state if output_final_state else None)
