"""Linear-attention Llama (``linear_llama``) and hybrid models (``hybrid``): single-device code.

A linear-attention mixer replaces softmax attention in a Llama block: q, k, v projections,
an optional decay, causal linear attention (``S_t = exp(g_t) S_{t-1} + k_t^T v_t``,
``o_t = scale q_t S_t``), a per-head RMSNorm of the output (as the LASP-2 / Lightning models
normalize it) and the output projection. Decay (``model.linear_attn.decay``):
- ``none``: plain causal linear attention;
- ``fixed``: per-head constant ``g_h = log(1 - 2^(-5 - h))`` (RetNet / Lightning Attention);
- ``data``: per-token, per-head scalar gate ``g = logsigmoid(x W_g) / 16`` (simple GLA).
No positional encoding: causal decay orders the tokens. Hybrids stack linear (``L``) and softmax
(``A``) blocks by ``model.layer_pattern``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqshard.kernels import rms_norm
from seqshard.kernels.linear_attention import linear_attention

from . import register_arch
from .config import ModelConfig
from .llama import Attention, Decoder


def linear_varlen(q, k, v, g, ctx):
    """Default single-device linear attention over a packed stream (state reset per document)."""
    o, _ = linear_attention(q[None], k[None], v[None], None if g is None else g[None], cu_seqlens=ctx.cu_seqlens)
    return o[0]


class LinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.decay = cfg.n_heads, cfg.head_dim, cfg.linear_attn.decay
        inner = cfg.n_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, inner, bias=False)
        self.wk = nn.Linear(cfg.dim, inner, bias=False)
        self.wv = nn.Linear(cfg.dim, inner, bias=False)
        self.wo = nn.Linear(inner, cfg.dim, bias=False)
        self.out_norm = nn.Parameter(torch.ones(cfg.head_dim))
        self.norm_eps = cfg.norm_eps
        if self.decay == "data":
            self.wg = nn.Linear(cfg.dim, cfg.n_heads, bias=True)
        if self.decay == "fixed":
            rates = [math.log(1 - 2.0 ** (-5 - h)) for h in range(cfg.n_heads)]
            self.register_buffer("fixed_log_decay", torch.tensor(rates), persistent=False)
        self.linear_attention_fn = linear_varlen

    def log_decay(self, x):
        if self.decay == "data":
            return F.logsigmoid(self.wg(x)) / 16  # [T, H]
        if self.decay == "fixed":
            return self.fixed_log_decay.expand(x.shape[0], -1)
        return None

    def forward(self, x, positions, ctx):
        t = x.shape[0]
        # [T, dim] -> [T, heads, head_dim]
        q = self.wq(x).view(t, self.n_heads, self.head_dim)
        k = self.wk(x).view(t, self.n_heads, self.head_dim)
        v = self.wv(x).view(t, self.n_heads, self.head_dim)
        o = self.linear_attention_fn(q, k, v, self.log_decay(x), ctx)  # [T, heads, head_dim]
        o = rms_norm(o, self.out_norm, self.norm_eps)
        return self.wo(o.reshape(t, self.n_heads * self.head_dim))


def build_linear_llama(cfg: ModelConfig) -> Decoder:
    return Decoder(cfg, [LinearAttention(cfg) for _ in range(cfg.n_layers)])


def build_hybrid(cfg: ModelConfig) -> Decoder:
    return Decoder(cfg, [LinearAttention(cfg) if c == "L" else Attention(cfg) for c in cfg.layer_pattern])


register_arch("linear_llama", build_linear_llama)
register_arch("hybrid", build_hybrid)
