"""What a model's attention callables receive besides q, k, v.

Models are single-device code: they pass ``ctx`` through untouched to the attention callable
their layers hold (``layer.attention_fn``). On one device ``ctx`` is a :class:`VarlenContext`;
under sequence parallelism ``parallelize()`` installs callables that understand the context the
trainer builds from the ShardPlan. The model never looks inside ``ctx``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqshard.kernels import attention


@dataclass
class VarlenContext:
    """A packed token stream on one device: document boundaries ``cu_seqlens`` (int32, [N+1])."""
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths, device=None):
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(torch.as_tensor(lengths, dtype=torch.int32, device=device), 0)
        return cls(cu, int(max(lengths)) if len(lengths) else 0)


def causal_varlen_attention(q, k, v, ctx: VarlenContext, **pattern):
    """Default softmax attention: causal, per document. q ``[T, H, D]``, k/v ``[T, H_kv, D]``;
    ``pattern``: a layer's ``window_size``, ``softcap``, ``chunk_size``, ``softmax_scale``, ``sinks``."""
    return attention(q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
                     causal=True, **pattern)
