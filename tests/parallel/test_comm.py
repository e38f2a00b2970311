"""Autograd collectives: forward/backward against their definitions, byte accounting, and a hung
peer turning into an error that names the rank and the operation."""
from datetime import timedelta

import torch
import torch.distributed as dist

from seqshard.dist.comm_stats import COMM_LOG, CollectiveError
from seqshard.parallel.comm import all_gather, all_to_all
from tests.helpers.ranks import run_ranks


def _collectives(rank, world):
    group = dist.group.WORLD
    COMM_LOG.reset()
    x = (torch.arange(world * 3, dtype=torch.float32).view(world, 3) + 100 * rank).requires_grad_()
    y = all_to_all(x, group)  # chunk j of rank i -> chunk i of rank j
    assert torch.equal(y.detach(), torch.stack([torch.arange(rank * 3, rank * 3 + 3) + 100.0 * i for i in range(world)]))
    (y * (rank + 1)).sum().backward()  # grad of chunk j comes back from rank j, scaled by (j + 1)
    assert torch.equal(x.grad, torch.arange(1, world + 1, dtype=torch.float32).view(world, 1).expand(world, 3))
    z = torch.full((2,), float(rank), requires_grad=True)
    g = all_gather(z, group)
    assert torch.equal(g.detach(), torch.arange(world, dtype=torch.float32).view(world, 1).expand(world, 2))
    g.sum().backward()  # every rank used every gathered copy once: reduce-scatter gives world
    assert torch.equal(z.grad, torch.full((2,), float(world)))
    snap = COMM_LOG.snapshot()
    assert snap["all_to_all"]["bytes"] == 3 * 4 * (world - 1)  # (P-1)/P of a [P, 3] fp32 buffer
    assert snap["all_gather"]["bytes"] == 2 * 4 * (world - 1)
    return True


def test_collectives_and_their_backward():
    assert all(run_ranks(3, _collectives))


def _one_rank_hangs(rank, world):
    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=3))
    if rank == 1:
        return "skipped"
    try:
        all_to_all(torch.zeros(world, 2), group, "ulysses.qkv")
    except CollectiveError as err:
        return str(err)
    return "no error"


def test_hung_peer_raises_naming_rank_and_operation():
    message = run_ranks(2, _one_rank_hangs, timeout=120)[0]
    assert message.startswith("rank 0: collective 'ulysses.qkv'") and "failed or timed out" in message, message
