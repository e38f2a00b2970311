"""Llama-style decoder on packed varlen input (single-device code; DESIGN.md invariant 1).

RMSNorm, RoPE with per-document positions, grouped-query attention, SwiGLU MLP, optional tied
embeddings. Input is a flat token stream ``[T]`` with per-token ``positions`` ``[T]`` and an
opaque attention context (see ``context.py``). Every attention layer calls
``self.attention_fn(q, k, v, ctx, **pattern)``; ``parallelize()`` replaces it from outside.

Attention patterns per layer (``ModelConfig.layer_type``): full, sliding-window (Mistral, Qwen2,
Gemma 2/3) or chunked (Llama 4), with optional soft-capping, a custom softmax scale, per-layer
RoPE theta (Gemma 3's local layers) and learned sinks (GPT-OSS). ``pattern`` holds only what
differs from plain causal attention, so a callable that cannot take a keyword fails loudly
instead of dropping the pattern. ``block: gemma`` gives Gemma's (1 + w) norms, the extra
post-attention / post-MLP norms, the GeLU-tanh MLP, the sqrt(dim) embedding scale and the final
logit soft-cap.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqshard.kernels import apply_rope, linear_cross_entropy, rms_norm
from seqshard.kernels.rope_scaling import rope_frequencies

from .config import ModelConfig
from .context import causal_varlen_attention


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaled by ``1 + weight`` (weights stored as offsets from 1, initialised to 0)."""

    def __init__(self, dim, eps):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return rms_norm(x, 1.0 + self.weight, self.eps)


LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def attention_pattern(cfg: ModelConfig, layer: int) -> dict:
    """The attention keywords of layer ``layer`` beyond plain causal (flash-attn's names)."""
    kind = cfg.layer_type(layer)
    assert kind in LAYER_TYPES, f"layer {layer}: attention kind {kind!r} not one of {LAYER_TYPES}"
    pattern = {}
    if kind == "sliding_attention":
        assert cfg.sliding_window > 0, f"layer {layer} is sliding but sliding_window is {cfg.sliding_window}"
        pattern["window_size"] = (cfg.sliding_window - 1, 0)
    if kind == "chunked_attention":
        assert cfg.attn_chunk_size > 0, f"layer {layer} is chunked but attn_chunk_size is {cfg.attn_chunk_size}"
        pattern["chunk_size"] = cfg.attn_chunk_size
    if cfg.attn_softcap:
        pattern["softcap"] = cfg.attn_softcap
    if cfg.attn_scale:
        pattern["softmax_scale"] = cfg.attn_scale
    return pattern


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.pattern = attention_pattern(cfg, layer)
        local = cfg.local_rope_theta and cfg.layer_type(layer) == "sliding_attention"
        self.rope_theta = cfg.local_rope_theta if local else cfg.rope_theta
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attention_fn = causal_varlen_attention
        # parallelize() may install a callable ``fn(self, x, positions, ctx)`` that runs the
        # whole layer (projections included): seqshard.parallel.ulysses_layer
        self.sp_layer_fn = None
        if cfg.qk_norm:  # Qwen3, Gemma 3: per-head RMSNorm of q and k
            norm = GemmaRMSNorm if cfg.block == "gemma" else RMSNorm
            self.q_norm = norm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = norm(cfg.head_dim, cfg.norm_eps)
        if cfg.attn_sinks:  # GPT-OSS: one sink logit per query head
            self.sinks = nn.Parameter(torch.zeros(cfg.n_heads))
        rs = cfg.rope_scaling
        inv_freq, self.rope_scale = rope_frequencies(cfg.head_dim, cfg.rope_theta, rs)
        if local:  # Gemma 3's sliding layers: their own theta, unscaled
            inv_freq, self.rope_scale = None, 1.0
        self.register_buffer("inv_freq", None if rs.type == "none" else inv_freq, persistent=False)

    def rotate(self, t, positions, which: str):
        """q (``which="q"``) or k ``[T, heads, head_dim]``: the optional per-head norm, then RoPE."""
        if hasattr(self, "q_norm"):
            t = (self.q_norm if which == "q" else self.k_norm)(t)
        return apply_rope(t, positions, self.rope_theta, self.inv_freq, self.rope_scale)

    def forward(self, x, positions, ctx):
        if self.sp_layer_fn is not None:  # a whole-layer SP method (copy-free Ulysses)
            return self.sp_layer_fn(self, x, positions, ctx)
        return self.standard_forward(x, positions, ctx)

    def standard_forward(self, x, positions, ctx):
        t = x.shape[0]
        # [T, dim] -> [T, heads, head_dim]
        q = self.wq(x).view(t, self.n_heads, self.head_dim)
        k = self.wk(x).view(t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(t, self.n_kv_heads, self.head_dim)
        q, k = self.rotate(q, positions, "q"), self.rotate(k, positions, "k")
        pattern = dict(self.pattern, sinks=self.sinks) if hasattr(self, "sinks") else self.pattern
        o = self.attention_fn(q, k, v, ctx, **pattern)  # [T, heads, head_dim]
        return self.wo(o.reshape(t, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(SwiGLU):
    """Gemma's gated MLP: ``w2(gelu_tanh(w1 x) * w3 x)`` (same weights as SwiGLU)."""

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))


class LMHead(nn.Linear):
    """Output projection; with labels, the summed token loss through the fused linear
    cross-entropy (no ``[tokens, vocab]`` logits are kept). A module of its own, so wrappers
    that gather parameters on forward (ZeRO-3) see the weight being used. ``softcap``: logits
    become ``softcap * tanh(logits / softcap)`` (Gemma), in the fused loss too.

    ``weights`` ``[T]`` (optional): per-token loss weights, the loss is ``sum_t w_t ce_t``. After a
    forward with labels, ``token_losses`` holds the unweighted per-token cross-entropy ``[T]``
    (fp32, detached, 0 where the label is -100): the trainer's ``loss_by_source``."""

    def __init__(self, dim, vocab, softcap: float = 0.0):
        super().__init__(dim, vocab, bias=False)
        self.softcap = softcap
        self.token_losses = None

    def forward(self, h, labels=None, weights=None):
        if labels is None:
            logits = super().forward(h)
            return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits
        self.token_losses = torch.zeros(labels.shape[0], dtype=torch.float32, device=h.device)
        return linear_cross_entropy(h, self.weight, labels, ignore_index=-100, reduction="sum",
                                    token_weights=weights, token_losses=self.token_losses,
                                    **({"softcap": self.softcap} if self.softcap else {}))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: nn.Module):
        super().__init__()
        gemma = cfg.block == "gemma"
        norm = GemmaRMSNorm if gemma else RMSNorm
        self.attn_norm = norm(cfg.dim, cfg.norm_eps)
        self.attn = mixer
        self.mlp_norm = norm(cfg.dim, cfg.norm_eps)
        self.mlp = (GeluMLP if gemma else SwiGLU)(cfg.dim, cfg.ffn_dim)
        if gemma:  # Gemma 2/3 "sandwich" norms on each branch's output
            self.post_attn_norm = norm(cfg.dim, cfg.norm_eps)
            self.post_mlp_norm = norm(cfg.dim, cfg.norm_eps)

    def forward(self, x, positions, ctx):
        if hasattr(self, "post_attn_norm"):
            x = x + self.post_attn_norm(self.attn(self.attn_norm(x), positions, ctx))
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attn(self.attn_norm(x), positions, ctx)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Embedding, a stack of blocks (each with its token mixer), final norm, LM head."""

    def __init__(self, cfg: ModelConfig, mixers: list[nn.Module]):
        super().__init__()
        self.cfg = cfg
        pad = cfg.embed_padding_idx if cfg.embed_padding_idx >= 0 else None
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=pad)
        self.layers = nn.ModuleList(self.make_block(cfg, m, i) for i, m in enumerate(mixers))
        self.norm = (GemmaRMSNorm if cfg.block == "gemma" else RMSNorm)(cfg.dim, cfg.norm_eps)
        self.lm_head = LMHead(cfg.dim, cfg.vocab_size, cfg.final_softcap)
        self.embed_scale = cfg.dim ** 0.5 if cfg.block == "gemma" else 0.0
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def make_block(self, cfg, mixer, index):
        """The block around layer ``index``'s mixer (MoE and MiniMax decoders build their own)."""
        return Block(cfg, mixer)

    def reset_parameters(self):
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)."""
        resid_std = 0.02 / math.sqrt(2 * len(self.layers))
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # norm weights stay 1, decay parameters keep their own init
            std = resid_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def hidden(self, tokens, positions, ctx):
        x = self.embed(tokens)
        if self.embed_scale:  # Gemma: the scale rounded to the weights' dtype, as transformers does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.norm(x)

    def forward(self, tokens, positions, ctx, labels=None, weights=None):
        """Logits ``[T, vocab]``, or with ``labels`` the *sum* of token losses (ignore -100),
        each token's loss times its ``weights`` entry when given (per-source loss weights).

        The trainer divides the sum by the step's global count (or weight sum) of loss tokens, so
        every parallel layout computes the same loss (DESIGN.md invariant 3).
        """
        return self.lm_head(self.hidden(tokens, positions, ctx), labels, weights)

    @property
    def token_losses(self):
        """The last labelled forward's unweighted per-token cross-entropy (LMHead)."""
        return self.lm_head.token_losses


def build_llama(cfg: ModelConfig) -> Decoder:
    if cfg.moe.num_experts:  # Qwen3-MoE, Mixtral: Llama blocks with mixture-of-experts MLPs
        from .moe import build_moe_llama

        return build_moe_llama(cfg)
    return Decoder(cfg, [Attention(cfg, i) for i in range(cfg.n_layers)])
