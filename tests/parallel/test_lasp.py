"""LASP-1 and LASP-2 equal single-device linear attention, forward and gradients of q, k, v, g."""
import torch
import torch.distributed as dist

from seqshard.dist.comm_stats import COMM_LOG
from seqshard.kernels.linear_attention import linear_attention
from seqshard.parallel.plan import ShardPlan
from tests.helpers.ranks import run_ranks

TOL = 1e-5


def close(name, a, b):
    err = (a - b).abs().max() / b.abs().max().clamp_min(1e-6)
    assert err <= TOL, f"{name}: rel err {err:.2e}"


def check_lasp(rank, world, method, cases):
    import importlib

    fn = getattr(importlib.import_module(f"seqshard.parallel.{method}"), f"{method}_attention")
    for i, (lengths, decay) in enumerate(cases):
        gen = torch.Generator().manual_seed(i)
        t, h, dk, dv = sum(lengths), 2, 4, 3
        q, k = torch.randn(t, h, dk, generator=gen), torch.randn(t, h, dk, generator=gen)
        v, dout = torch.randn(t, h, dv, generator=gen), torch.randn(t, h, dv, generator=gen)
        g = torch.nn.functional.logsigmoid(torch.randn(t, h, generator=gen)) / 3 if decay else None
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)] + ([g.clone().requires_grad_()] if decay else [])
        ref, _ = linear_attention(*[x[None] for x in ref_in[:3]], ref_in[3][None] if decay else None, cu_seqlens=cu)
        ref[0].backward(dout)
        plan = ShardPlan.build(cu.tolist(), world, "stream")
        local = [plan.shard(x, rank).requires_grad_() for x in (q, k, v)] + \
            ([plan.shard(g, rank).requires_grad_()] if decay else [])
        out = fn(*local[:3], local[3] if decay else None, plan, dist.group.WORLD)
        out.backward(plan.shard(dout, rank))
        real = torch.from_numpy(plan.index[rank] >= 0)
        tag = f"{method} case {i} {lengths} decay={decay}"
        close(f"{tag} out", out[real], plan.shard(ref[0].detach(), rank)[real])
        for name, got, want in zip("qkvg", local, ref_in):
            close(f"{tag} d{name}", got.grad[real], plan.shard(want.grad, rank)[real])
    return True


# documents spanning several ranks, shorter than a rank's chunk, a single document
CASES = [([37], True), ([5, 40, 2, 9], True), ([3, 3, 50], False), ([61, 1], True)]


def test_lasp2_two_and_four_ranks():
    assert all(run_ranks(2, check_lasp, "lasp2", CASES))
    assert all(run_ranks(4, check_lasp, "lasp2", CASES))


def test_lasp1_two_and_four_ranks():
    assert all(run_ranks(2, check_lasp, "lasp1", CASES))
    assert all(run_ranks(4, check_lasp, "lasp1", CASES))


def test_lasp2_through_the_triton_kernel(monkeypatch):
    """The local pieces go through one varlen Triton call (padding runs as their own segments)."""
    monkeypatch.setenv("SEQSHARD_KERNELS", "triton")  # inherited by the spawned ranks
    assert all(run_ranks(2, check_lasp, "lasp2", [([5, 40, 2, 9], True), ([61, 1], False)]))


def lasp2_bytes(rank, world):
    from seqshard.parallel.lasp2 import lasp2_attention

    sent = []
    for t in (64, 256):  # T and 4T
        q = torch.randn(t, 2, 4, requires_grad=True)
        plan = ShardPlan.build([0, t], world, "stream")
        COMM_LOG.reset()
        out = lasp2_attention(plan.shard(q, rank), plan.shard(q, rank), plan.shard(q, rank)[..., :3],
                              None, plan, dist.group.WORLD)
        out.sum().backward()
        sent.append(COMM_LOG.snapshot()["total"]["bytes"])
    return sent


def test_lasp2_bytes_do_not_grow_with_sequence_length():
    for a, b in run_ranks(2, lasp2_bytes):
        assert a == b > 0, (a, b)
