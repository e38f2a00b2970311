"""Rank functions comparing SP attention with the single-device reference (forward + grads)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqshard.kernels import attention
from seqshard.parallel.plan import ShardPlan

FP32_RTOL = 1e-5  # relative to the reference tensor's max magnitude


def assert_close(name, got, ref, rtol=FP32_RTOL):
    scale = ref.abs().max().clamp_min(1e-6)
    err = (got - ref).abs().max() / scale
    assert err <= rtol, f"{name}: max rel error {err:.2e} > {rtol:.0e}"


def inputs(lengths, n_heads, n_kv, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, n_heads, head_dim, generator=gen)
    k = torch.randn(total, n_kv, head_dim, generator=gen)
    v = torch.randn(total, n_kv, head_dim, generator=gen)
    dout = torch.randn(total, n_heads, head_dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, dout, cu


def compare_case(rank, world, run, case, layout, tag):
    """Run ``run(local_q, local_k, local_v, plan, causal)`` on this rank's shards of one case
    and compare its output and dq/dk/dv with the reference rows the ShardPlan gives this rank."""
    lengths, n_heads, n_kv, causal = case
    q, k, v, dout, cu = inputs(lengths, n_heads, n_kv, 8, seed=sum(lengths) + n_heads)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_in, cu, cu, max(lengths), max(lengths), causal=causal)
    ref.backward(dout)
    plan = ShardPlan.build(cu.tolist(), world, layout)
    local = [plan.shard(t, rank).requires_grad_() for t in (q, k, v)]
    out = run(*local, plan, causal)
    out.backward(plan.shard(dout, rank))
    real = torch.from_numpy(plan.index[rank] >= 0)
    tag = f"{tag} {lengths} H{n_heads}/{n_kv} causal={causal}"
    assert_close(f"{tag} out", out[real], plan.shard(ref.detach(), rank)[real])
    for name, got, want in zip("qkv", local, ref_in):
        assert_close(f"{tag} d{name}", got.grad[real], plan.shard(want.grad, rank)[real])


def method_attention(method):
    """``seqshard.parallel.<method>.<method>_attention``."""
    import importlib

    return getattr(importlib.import_module(f"seqshard.parallel.{method}"), f"{method}_attention")


def usp_groups(world, ulysses):
    """The (Ulysses, ring) groups of a (ring x ulysses) DeviceMesh over ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world // ulysses, ulysses), mesh_dim_names=("ring", "ulysses"))
    return mesh["ulysses"].get_group(), mesh["ring"].get_group()


def check_method(rank, world, method, cases, layout):
    """Every case: the method's local output and dq/dk/dv equal the reference's rows."""
    fn = method_attention(method)
    for case in cases:
        compare_case(rank, world, lambda q, k, v, plan, causal: fn(q, k, v, plan, dist.group.WORLD, causal=causal),
                     case, layout, f"{method}/{layout}")
    return True


def check_usp(rank, world, ulysses, cases, layout):
    """USP over a (ring x ulysses) DeviceMesh equals the reference, forward and gradients."""
    from seqshard.parallel.usp import usp_attention

    groups = usp_groups(world, ulysses)
    for case in cases:
        compare_case(rank, world, lambda q, k, v, plan, causal: usp_attention(q, k, v, plan, groups, causal=causal),
                     case, layout, f"usp U={ulysses}")
    return True
