"""MiniMax-Text-01 (``arch: minimax``): lightning linear attention + softmax layers + MoE MLPs.

Single-device code with the semantics of transformers' ``MiniMaxForCausalLM``:
- lightning attention (``L`` layers): ``q, k, v = silu(x W_qkv)`` (per head ``[q | k | v]``),
  causal linear attention with a fixed per-head decay ``exp(-s_h)``, no ``1/sqrt(d)`` scale,
  ``s_h = 2^(-8 (h + 1) / H) * (1 - i / (n_layers - 1 + 1e-5) + 1e-5)`` in layer i; then RMSNorm
  over all heads together (eps 1e-6), an output gate ``sigmoid(x W_gate)`` and ``W_out``.
  The linear attention is seqshard's (``linear_attention_fn``: chunked kernels on one device,
  LASP-1 / LASP-2 under SP, installed by ``parallelize()``) with ``g = -s_h``; the kernels scale q
  by ``d^-1/2``, so q enters multiplied by ``d^1/2``;
- softmax layers (``A``): Llama attention with RoPE, GQA (``parallel.softmax_method`` under SP);
- block: the residual is the *normalised* input: ``h = norm1(x); x = alpha h + beta mixer(h);
  h = norm2(x); out = alpha_mlp h + beta_mlp moe(h)`` (alpha / beta per layer kind,
  ``model.minimax``); MLPs are :class:`~seqshard.models.moe.MoE` (softmax top-k, renormalised).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqshard.kernels import rms_norm

from . import register_arch
from .config import ModelConfig
from .linear_llama import linear_varlen
from .llama import Attention, RMSNorm
from .moe import MoE, MoEDecoder


def slope_rates(n_heads: int, layer: int, n_layers: int) -> torch.Tensor:
    """MiniMax's per-head decay rates ``s_h`` of layer ``layer`` (fp32, ``[H]``)."""
    base = 1 / (2 ** (8 / n_heads))
    rate = base ** (torch.arange(n_heads) + 1)
    return rate * (1 - layer / (n_layers - 1 + 1e-5) + 1e-5)


class LightningAttention(nn.Module):
    NORM_EPS = 1e-6  # transformers builds this norm without the config's rms_norm_eps

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.output_gate = nn.Linear(cfg.dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, cfg.dim, bias=False)
        self.norm = nn.Parameter(torch.ones(inner))
        self.register_buffer("log_decay", -slope_rates(cfg.n_heads, layer, cfg.n_layers), persistent=False)
        self.linear_attention_fn = linear_varlen

    def forward(self, x, positions, ctx):
        t = x.shape[0]
        # [T, dim] -> [T, heads, 3 * head_dim] -> 3 x [T, heads, head_dim]
        q, k, v = F.silu(self.qkv_proj(x)).view(t, self.n_heads, 3 * self.head_dim).split(self.head_dim, -1)
        g = self.log_decay.to(x.dtype).expand(t, -1)  # [T, heads]
        o = self.linear_attention_fn(q * self.head_dim ** 0.5, k, v, g, ctx)
        o = rms_norm(o.reshape(t, -1), self.norm, self.NORM_EPS)
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * o)


class MiniMaxBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: nn.Module, linear: bool):
        super().__init__()
        b = cfg.minimax
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = mixer
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg)
        self.alpha, self.beta = (b.linear_alpha, b.linear_beta) if linear else (b.full_alpha, b.full_beta)
        self.mlp_alpha, self.mlp_beta = b.mlp_alpha, b.mlp_beta

    def forward(self, x, positions, ctx):
        h = self.attn_norm(x)
        x = self.alpha * h + self.beta * self.attn(h, positions, ctx)
        h = self.mlp_norm(x)
        return self.mlp_alpha * h + self.mlp_beta * self.mlp(h)


class MiniMaxDecoder(MoEDecoder):
    def make_block(self, cfg, mixer, index):
        return MiniMaxBlock(cfg, mixer, cfg.layer_pattern[index] == "L")


def build_minimax(cfg: ModelConfig) -> MiniMaxDecoder:
    return MiniMaxDecoder(cfg, [LightningAttention(cfg, i) if c == "L" else Attention(cfg, i)
                                for i, c in enumerate(cfg.layer_pattern)])


register_arch("minimax", build_minimax)
