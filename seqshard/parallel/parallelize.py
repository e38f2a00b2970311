"""``parallelize(model, mesh, cfg)``: install sequence-parallel attention into an unchanged model.

Softmax layers (modules with ``attention_fn``) get the spec's SP method; linear-attention layers
(modules with ``linear_attention_fn``) get LASP. Each softmax callable passes the layer's attention
pattern (``window_size``, ``softcap``, ``chunk_size``, ``softmax_scale``, ``sinks``) to its method. Every installed callable reads the step's
:class:`SPContext` (the ShardPlan of the micro-batch and the groups) that the trainer's sharder
builds, so the model itself never touches torch.distributed (DESIGN.md invariant 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .plan import ShardPlan


@dataclass
class SPContext:
    plan: ShardPlan
    group: Any  # the SP process group
    ulysses_group: Any = None  # usp only
    ring_group: Any = None  # usp only


def _ulysses(q, k, v, ctx, **pattern):
    from .ulysses import ulysses_attention

    return ulysses_attention(q, k, v, ctx.plan, ctx.group, causal=True, **pattern)


def _allgather(q, k, v, ctx, **pattern):
    from .allgather import allgather_attention

    return allgather_attention(q, k, v, ctx.plan, ctx.group, causal=True, **pattern)


def _ring(q, k, v, ctx, **pattern):
    from .ring import ring_attention

    return ring_attention(q, k, v, ctx.plan, ctx.group, causal=True, **pattern)


def _usp(q, k, v, ctx, **pattern):
    from .usp import usp_attention

    return usp_attention(q, k, v, ctx.plan, (ctx.ulysses_group, ctx.ring_group), causal=True, **pattern)


def _lasp1(q, k, v, g, ctx):
    from .lasp1 import lasp1_attention

    return lasp1_attention(q, k, v, g, ctx.plan, ctx.group)


def _lasp2(q, k, v, g, ctx):
    from .lasp2 import lasp2_attention

    return lasp2_attention(q, k, v, g, ctx.plan, ctx.group)


SOFTMAX_METHODS = {"ulysses": _ulysses, "allgather": _allgather, "ring": _ring, "usp": _usp}
LINEAR_METHODS = {"lasp1": _lasp1, "lasp2": _lasp2}
# Layout each method shards with when parallel.layout is auto: ring-style methods balance causal
# work with zigzag; Ulysses and all-gather see whole documents, so the least padding wins;
# LASP carries state along the stream.
DEFAULT_LAYOUT = {"ulysses": "stream", "allgather": "zigzag", "ring": "zigzag", "usp": "zigzag",
                  "lasp1": "stream", "lasp2": "stream"}


def layout_of(cfg) -> str:
    return DEFAULT_LAYOUT[cfg.sp_method] if cfg.layout == "auto" else cfg.layout


def build_plan(cu_seqlens, cfg) -> ShardPlan:
    return ShardPlan.build(cu_seqlens, cfg.sp, layout_of(cfg))


def parallelize(model, mesh, cfg):
    """Install the SP attention of ``cfg.sp_method`` (and, in hybrids, ``cfg.softmax_method`` on
    the softmax layers of a linear-attention model). Returns the model."""
    linear = cfg.sp_method in LINEAR_METHODS
    method = cfg.softmax_method if linear else cfg.sp_method
    softmax = SOFTMAX_METHODS[method]
    layer_fn = fused_layer(cfg) if method in ("ulysses", "usp") else None
    for module in model.modules():
        if hasattr(module, "attention_fn"):
            module.attention_fn = softmax
            if hasattr(module, "sp_layer_fn"):  # seqshard's native Attention: the whole layer
                module.sp_layer_fn = layer_fn
        if linear and hasattr(module, "linear_attention_fn"):
            module.linear_attention_fn = LINEAR_METHODS[cfg.sp_method]
        if hasattr(module, "doc_sums_fn"):  # MoE: per-document router statistics over the SP group
            from .moe_stats import sp_doc_reduce, sp_doc_sums

            module.doc_sums_fn, module.doc_reduce_fn = sp_doc_sums, sp_doc_reduce
    return model


def fused_layer(cfg):
    """The copy-free (pipelined with ``ulysses_chunks`` > 1) Ulysses layer of ``cfg``."""
    from .ulysses_layer import FusedUlysses

    chunks = getattr(cfg, "ulysses_chunks", 1)
    return FusedUlysses(0 if chunks == "auto" else chunks, getattr(cfg, "comm_dtype", "fp32"))


_NO_SOURCES = object()


def make_sharder(mesh, cfg, pad_id: int):
    """Turns a micro-batch's global stream into this rank's shard and its SPContext:
    ``shard(tokens, labels, positions, doc_lens)`` -> (tokens, labels, positions, ctx); with
    ``sources=`` (each token's source index, or None) a fifth entry, those of the shard (-1 on
    padding), so per-token loss weights follow their tokens under every layout."""
    sp_mesh = mesh["sp"]
    group, rank = sp_mesh.get_group(), sp_mesh.get_local_rank()
    uly = ring = None
    if cfg.sp_method == "usp":
        uly, ring = mesh["ulysses"].get_group(), mesh["ring"].get_group()

    def shard(tokens, labels, positions, doc_lens, sources=_NO_SOURCES):
        cu = [0]
        for n in doc_lens:
            cu.append(cu[-1] + n)
        plan = build_plan(cu, cfg)
        out = (plan.shard(tokens, rank, pad_value=pad_id), plan.shard(labels, rank, pad_value=-100),
               plan.shard(positions, rank, pad_value=0), SPContext(plan, group, uly, ring))
        if sources is _NO_SOURCES:
            return out
        return (*out, None if sources is None else plan.shard(sources, rank, pad_value=-1))

    return shard
