"""Rank functions: SP attention with windows, soft-caps, chunks and sinks against the dense
single-device reference, forward and every gradient (dq, dk, dv, dsinks), rows per the ShardPlan."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from seqshard.kernels.attention import attention_reference
from seqshard.kernels.attention.masks import make_mask, visible
from seqshard.parallel.plan import ShardPlan
from tests.parallel.sp_checks import assert_close, inputs, method_attention, usp_groups


def _sinks(n_heads, seed):
    return torch.randn(n_heads, generator=torch.Generator().manual_seed(seed + 7))


def compare_pattern(rank, world, run, case, layout, tag):
    """``case = (lengths, n_heads, n_kv, causal, pattern)``; pattern may hold ``sinks=True``."""
    lengths, n_heads, n_kv, causal, pattern = case
    pattern = dict(pattern)
    with_sinks = pattern.pop("sinks", False)
    q, k, v, dout, cu = inputs(lengths, n_heads, n_kv, 8, seed=sum(lengths) + n_heads)
    sinks = _sinks(n_heads, sum(lengths)) if with_sinks else None
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_sinks = sinks.clone().requires_grad_() if with_sinks else None
    ref = attention_reference(*ref_in, cu, cu, causal=causal, sinks=ref_sinks, **pattern)
    ref.backward(dout)
    plain = attention_reference(q, k, v, cu, cu, causal=causal)
    assert (ref.detach() - plain).abs().max() > 1e-3, f"{pattern}: the case cannot tell a dropped pattern"
    plan = ShardPlan.build(cu.tolist(), world, layout)
    local = [plan.shard(t, rank).requires_grad_() for t in (q, k, v)]
    local_sinks = sinks.clone().requires_grad_() if with_sinks else None
    out = run(*local, plan, causal, dict(pattern, sinks=local_sinks))
    out.backward(plan.shard(dout, rank))
    real = torch.from_numpy(plan.index[rank] >= 0)
    tag = f"{tag} {lengths} H{n_heads}/{n_kv} causal={causal} {pattern} sinks={with_sinks}"
    assert_close(f"{tag} out", out[real], plan.shard(ref.detach(), rank)[real])
    for name, got, want in zip("qkv", local, ref_in):
        assert_close(f"{tag} d{name}", got.grad[real], plan.shard(want.grad, rank)[real])
    if with_sinks:  # each rank's share of the sink gradient; their sum is the reference's
        total = local_sinks.grad.clone()
        dist.all_reduce(total)
        assert_close(f"{tag} dsinks", total, ref_sinks.grad)
    return True


def check_method_patterns(rank, world, method, cases, layout):
    fn = method_attention(method)
    for case in cases:
        compare_pattern(rank, world, lambda q, k, v, plan, causal, pat: fn(q, k, v, plan, dist.group.WORLD,
                                                                           causal=causal, **pat),
                        case, layout, f"{method}/{layout}")
    return True


def check_usp_patterns(rank, world, ulysses, cases, layout):
    from seqshard.parallel.usp import usp_attention

    groups = usp_groups(world, ulysses)
    for case in cases:
        compare_pattern(rank, world, lambda q, k, v, plan, causal, pat: usp_attention(q, k, v, plan, groups,
                                                                                      causal=causal, **pat),
                        case, layout, f"usp U={ulysses}/{layout}")
    return True


def window_minimum_tokens(plan, rank, mask):
    """Brute force: keys held by ``rank`` that some query of another rank sees, counted once per
    receiving rank (the fewest K/V tokens ``rank`` can send)."""
    cu = plan.cu_seqlens
    doc_of = np.searchsorted(cu, np.arange(cu[-1]), side="right") - 1
    pos = np.arange(cu[-1]) - np.asarray(cu)[doc_of]
    mine = plan.index[rank][plan.index[rank] >= 0]
    count = 0
    for other in range(plan.world):
        if other == rank:
            continue
        theirs = plan.index[other][plan.index[other] >= 0]
        same_doc = doc_of[theirs][:, None] == doc_of[mine][None, :]
        seen = visible(torch.from_numpy(pos[theirs]), torch.from_numpy(pos[mine]), mask).numpy() & same_doc
        count += int(seen.any(0).sum())
    return count


def measure_window_ring_bytes(rank, world, length, window, layout, n_kv, head_dim):
    """Forward K/V bytes this rank sends in windowed ring attention, and the brute-force minimum."""
    from seqshard.dist.comm_stats import COMM_LOG
    from seqshard.parallel.ring import ring_attention

    q, k, v, _, cu = inputs([length], 2 * n_kv, n_kv, head_dim, seed=1)
    plan = ShardPlan.build(cu.tolist(), world, layout)
    COMM_LOG.reset()
    with torch.no_grad():
        ring_attention(plan.shard(q, rank), plan.shard(k, rank), plan.shard(v, rank), plan, dist.group.WORLD,
                       causal=True, window_size=(window - 1, 0))
    sent = COMM_LOG.snapshot().get("ring_window.kv", {"bytes": 0})["bytes"]
    minimum = window_minimum_tokens(plan, rank, make_mask(True, (window - 1, 0))) * 2 * n_kv * head_dim * 4
    full_ring = (world - 1) * plan.local_len * 2 * n_kv * head_dim * 4
    return sent, minimum, full_ring
