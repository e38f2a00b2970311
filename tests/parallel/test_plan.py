import numpy as np
import pytest
import torch

from seqshard.parallel.plan import ShardPlan
from tests.helpers.ranks import run_ranks

CASES = [[3, 17, 1, 19], [64], [1, 1, 1], [5, 100, 7, 2, 33]]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "stream"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_token_held_exactly_once(layout, world):
    for lengths in CASES:
        cu = [0, *np.cumsum(lengths).tolist()]
        plan = ShardPlan.build(cu, world, layout)
        held = plan.index[plan.index >= 0]
        assert sorted(held.tolist()) == list(range(cu[-1]))
        x = torch.arange(cu[-1]) * 10
        for r in range(world):
            local = plan.shard(x, r, pad_value=-1)
            assert len(local) == plan.local_len
            assert ((local == -1) == torch.from_numpy(plan.index[r] < 0)).all()
        # padded positions form a permutation of the padded stream
        assert sorted(plan.padded_index.ravel().tolist()) == list(range(world * plan.local_len))


def test_zigzag_balances_causal_work():
    lengths = [4096, 1000, 3000, 64]
    cu = [0, *np.cumsum(lengths).tolist()]
    for world in (2, 4):
        zig = ShardPlan.build(cu, world, "zigzag")
        con = ShardPlan.build(cu, world, "contiguous")
        zw = [zig.causal_work(r) for r in range(world)]
        cw = [con.causal_work(r) for r in range(world)]
        assert max(zw) / np.mean(zw) <= 1.05, zw
        assert max(cw) / np.mean(cw) > 1.3, cw  # what zigzag fixes


def _round_trip(rank, world, layout):
    import torch.distributed as dist

    cu = [0, 3, 20, 21, 40]
    plan = ShardPlan.build(cu, world, layout)
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
    back = plan.gather(plan.shard(x, rank), dist.group.WORLD)
    assert torch.equal(back, x)
    return True


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "stream"])
def test_gather_inverts_shard(layout):
    assert run_ranks(2, _round_trip, layout) == [True, True]
