"""``model: {hf: PATH, impl: transformers}``: any transformers causal LM under seqshard's SP (generic wrap).

The model stays transformers' own code. Its attention layers call the attention function registered
here under the name ``seqshard`` (``transformers.AttentionInterface.register``, loaded with
``attn_implementation="seqshard"``), which hands q, k, v to the attention module's ``attention_fn``:
``causal_varlen_attention`` on one device, the SP method once ``parallelize()`` has swapped it
(the same callables as the native model's, so heads or sequence are exchanged the same way).

How the step's context reaches it: on one device, the varlen keyword arguments transformers
forwards to flash-attention (``cu_seq_lens_q/k``, ``max_length_q/k``); under SP, the ShardPlan's
``SPContext`` as ``seqshard_ctx`` (for the few models whose attention drops ``**kwargs``, also as
an attribute of each attention module during the wrap's forward). Positions are the global per-document ones, so RoPE is right on
every shard. No ``[L, L]`` mask is built: the ``seqshard`` implementation has no mask function, so
transformers passes ``attention_mask=None``.

The loss is summed over the shard's labels like the native model's: through the fused
``linear_cross_entropy`` on the last hidden states when the model's logits are
``cap(scale * (hidden @ lm_head.weight.T + bias))`` with the head's bias, the config's
``logit_scale`` and ``final_logit_softcapping`` (checked once, on a few tokens, when the model is
built), else from the model's own logits. Per-token loss ``weights`` (per-source ``loss_weight``)
multiply each token's loss on either path.

Attention patterns: transformers hands each layer's ``sliding_window`` (``W`` tokens, itself
included: ``window_size=(W - 1, 0)``), ``softcap``, ``scaling`` and GPT-OSS's sink logits
(``s_aux``) to the attention function; they go to ``attention_fn`` as seqshard's keywords. The
wrap checks each layer's window against config.json's ``layer_types`` (a model that expresses a
window only through a mask would otherwise lose it) and refuses chunked attention (Llama 4
builds it as a mask the wrap cannot take): nothing is dropped silently.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from seqshard.kernels import linear_cross_entropy

from .context import VarlenContext, causal_varlen_attention

ATTN_IMPLEMENTATION = "seqshard"


def seqshard_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                       sliding_window=None, softcap=None, seqshard_ctx=None, s_aux=None, **kwargs):
    """transformers' attention-interface signature -> seqshard's ``attention_fn(q, k, v, ctx)``.

    query ``[1, H, T, D]``, key/value ``[1, H_kv, T, D]`` -> (out ``[1, T, H, D]``, None)."""
    fn = getattr(module, "attention_fn", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no attention_fn: build the model with wrap_hf()")
    if query.shape[0] != 1:
        raise ValueError(f"seqshard attention takes one packed row (batch 1), got batch {query.shape[0]}")
    if attention_mask is not None:  # a model that builds its own mask: it would be ignored here
        raise ValueError(f"{type(module).__name__} passed an attention mask of shape "
                         f"{tuple(attention_mask.shape)}; seqshard attention is causal per document "
                         "(cu_seqlens) and cannot honour another mask")
    if dropout:
        raise ValueError(f"{type(module).__name__}: attention dropout ({dropout}) is not supported by seqshard "
                         "attention (every layout must give the same loss)")
    expected = getattr(module, "seqshard_window", None)
    if expected != sliding_window:
        raise ValueError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}): config.json gives "
                         f"a sliding window of {expected}, the layer passed {sliding_window}; refusing to guess")
    ctx = seqshard_ctx if seqshard_ctx is not None else getattr(module, "seqshard_ctx", None)
    if ctx is None:
        if kwargs.get("cu_seq_lens_q") is None:
            raise ValueError("seqshard attention needs cu_seq_lens_q / max_length_q (packed varlen "
                             "input) or seqshard_ctx")
        ctx = VarlenContext(kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"]))
    # under autocast, RoPE in fp32 leaves q/k fp32 beside a bf16 v: one dtype, autocast's (as flash-attn)
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
    # [1, heads, T, head_dim] -> [T, heads, head_dim]
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (query, key, value))
    pattern = {}
    if sliding_window:
        pattern["window_size"] = (int(sliding_window) - 1, 0)
    if softcap:
        pattern["softcap"] = float(softcap)
    if scaling is not None and abs(scaling * q.shape[-1] ** 0.5 - 1.0) > 1e-12:
        pattern["softmax_scale"] = float(scaling)
    if s_aux is not None:
        pattern["sinks"] = s_aux
    out = fn(q, k, v, ctx, **pattern)  # [T, heads, head_dim]
    return out[None], None


def layer_windows(config) -> list | None:
    """Each layer's sliding window per the config (None: full), or None when the config has none.
    Chunked attention is refused: transformers expresses it as a mask, which the wrap never gets."""
    types = getattr(config, "layer_types", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk or (types and "chunked_attention" in types):
        raise ValueError(f"{type(config).__name__}: chunked attention (attention_chunk_size {chunk}) is built as "
                         "a mask by transformers and cannot run under model.impl: transformers")
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * config.num_hidden_layers


def register_attention():
    """Register ``seqshard`` with transformers' attention interface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, seqshard_attention)


def _attention_modules(model):
    """The modules that call the attention interface: one per layer, named ``*Attention``."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "config")]


def _decoder_layers(base, n_layers: int):
    for module in base.children():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"{type(base).__name__}: no ModuleList of {n_layers} decoder layers")


class HFWrap(nn.Module):
    """A transformers causal LM with seqshard's forward contract: ``model(tokens, positions, ctx)``
    -> logits ``[T, vocab]``, or with ``labels`` the sum of token losses (ignore -100)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        self.hf.config.use_cache = False
        mods = _attention_modules(hf_model)
        if not mods:
            raise ValueError(f"{type(hf_model).__name__}: no *Attention modules to install seqshard attention in")
        windows = layer_windows(hf_model.config)
        for m in mods:
            m.attention_fn = causal_varlen_attention
            m.seqshard_window = windows[m.layer_idx] if windows and hasattr(m, "layer_idx") else None
        self._attention = tuple(mods)  # a tuple: not registered again as submodules
        self.token_losses = None  # the last labelled forward's per-token cross-entropy (trainer metrics)
        self.fused_loss = self._logits_are_plain_linear()

    @property
    def layers(self):
        """The decoder layers (FSDP2 shards each; no second registration, names stay ``hf.*``)."""
        return _decoder_layers(self.hf.base_model, self.hf.config.num_hidden_layers)

    def _kwargs(self, tokens, positions, ctx):
        kw = {"input_ids": tokens[None], "position_ids": positions[None], "use_cache": False}
        if isinstance(ctx, VarlenContext):
            kw.update(cu_seq_lens_q=ctx.cu_seqlens, cu_seq_lens_k=ctx.cu_seqlens,
                      max_length_q=ctx.max_seqlen, max_length_k=ctx.max_seqlen)
        else:
            kw["seqshard_ctx"] = ctx
        return kw

    def _head_terms(self) -> dict:
        """The output head as ``linear_cross_entropy`` keywords: its bias, the config's logit scale
        (Cohere) and final soft-cap (Gemma 2/3)."""
        head, cfg = self.hf.get_output_embeddings(), self.hf.config
        terms = {"bias": head.bias} if getattr(head, "bias", None) is not None else {}
        if getattr(cfg, "logit_scale", None):
            terms["logit_scale"] = float(cfg.logit_scale)
        if getattr(cfg, "final_logit_softcapping", None):
            terms["softcap"] = float(cfg.final_logit_softcapping)
        return terms

    @torch.no_grad()
    def _logits_are_plain_linear(self) -> bool:
        """Whether the model's logits are ``cap(scale * (hidden @ W.T + b))`` with the terms of
        ``_head_terms`` (checked on a few tokens), so the fused loss can stand in for them."""
        head = self.hf.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            return False
        terms = self._head_terms()
        tokens = torch.arange(8, device=head.weight.device) % self.hf.config.vocab_size
        args = (tokens, torch.arange(8, device=tokens.device), VarlenContext.from_lengths([8], tokens.device))
        with self._context(args[2]):
            h = self.hf.base_model(**self._kwargs(*args)).last_hidden_state[0]
            logits = self.hf(**self._kwargs(*args)).logits[0]
        ours = F.linear(h, head.weight, terms.get("bias")) * terms.get("logit_scale", 1.0)
        if terms.get("softcap"):
            ours = torch.tanh(ours / terms["softcap"]) * terms["softcap"]
        return torch.allclose(ours, logits, rtol=1e-5, atol=1e-6)

    @contextmanager
    def _context(self, ctx):
        """Models whose attention does not forward ``**kwargs`` read the context from their module."""
        for m in self._attention:
            m.seqshard_ctx = ctx
        try:
            yield
        finally:
            for m in self._attention:
                m.seqshard_ctx = None

    def forward(self, tokens, positions, ctx, labels=None, weights=None):
        """Logits, or with ``labels`` the summed token loss (each token's times its ``weights``
        entry when given); then ``token_losses`` holds the unweighted per-token cross-entropy."""
        with self._context(ctx):
            return self._forward(tokens, positions, ctx, labels, weights)

    def _forward(self, tokens, positions, ctx, labels, weights=None):
        kw = self._kwargs(tokens, positions, ctx)
        if labels is not None and self.fused_loss:
            h = self.hf.base_model(**kw).last_hidden_state[0]
            self.token_losses = torch.zeros(labels.shape[0], dtype=torch.float32, device=h.device)
            return linear_cross_entropy(h, self.hf.get_output_embeddings().weight, labels,
                                        ignore_index=-100, reduction="sum", token_weights=weights,
                                        token_losses=self.token_losses, **self._head_terms())
        logits = self.hf(**kw).logits[0]  # [T, vocab]
        if labels is None:
            return logits
        if weights is None:
            loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            with torch.no_grad():
                self.token_losses = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
            return loss
        per_token = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
        self.token_losses = per_token.detach()
        return (per_token * weights.to(per_token.dtype)).sum()


def wrap_hf(path, dtype=torch.float32) -> HFWrap:
    """The local Hugging Face folder ``path`` loaded by transformers with seqshard attention."""
    from transformers import AutoModelForCausalLM

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
                                                 local_files_only=True)
    model.train()
    return HFWrap(model)
