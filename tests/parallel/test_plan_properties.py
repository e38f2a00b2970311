"""ShardPlan properties over random document mixes (hypothesis; pure, many examples): every real
token is held exactly once, ``shard`` followed by the inverse index map (what ``gather`` does
after its all-gather) gives the stream back, and each rank's segments tile its shard."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqshard.parallel.plan import LAYOUTS, ShardPlan

LENGTHS = st.lists(st.one_of(st.integers(0, 1), st.integers(0, 9), st.integers(0, 300)), min_size=1, max_size=8)


def unshard(plan, shards):
    """What ``ShardPlan.gather`` does with the all-gathered shards, without a process group."""
    flat, idx = torch.cat(shards), torch.from_numpy(plan.index.reshape(-1))
    out = flat.new_full((plan.total_len, *flat.shape[1:]), -7)
    out[idx[idx >= 0]] = flat[idx >= 0]
    return out


def check_round_trip(lengths, world, layout):
    cu = [0, *np.cumsum(lengths).tolist()]
    plan = ShardPlan.build(cu, world, layout)
    assert sorted(plan.index[plan.index >= 0].tolist()) == list(range(cu[-1]))
    x = torch.arange(cu[-1] * 2).view(-1, 2)
    shards = [plan.shard(x, r, pad_value=-1) for r in range(world)]
    assert all(s.shape == (plan.local_len, 2) for s in shards)
    assert torch.equal(unshard(plan, shards), x)
    for r in range(world):
        assert ((shards[r][:, 0] == -1) == torch.from_numpy(plan.index[r] < 0)).all()
        cu_local = plan.local_cu_seqlens(r)
        assert cu_local[0] == 0 and cu_local[-1] == plan.local_len and (cu_local[1:] > cu_local[:-1]).all()
        for piece, off, n in plan.segments(r):  # a real segment is a run of one document, in order
            if piece.doc >= 0:
                held = plan.index[r, off:off + n]
                assert (held == cu[piece.doc] + piece.start + np.arange(n)).all()
    # padded positions form a permutation of the padded stream
    assert sorted(plan.padded_index.ravel().tolist()) == list(range(world * plan.local_len))


EXAMPLE = dict(lengths=LENGTHS, world=st.integers(1, 5), layout=st.sampled_from(LAYOUTS))
test_shard_then_gather_is_the_identity = settings(max_examples=150, deadline=None, database=None)(
    given(**EXAMPLE)(check_round_trip))
test_shard_then_gather_is_the_identity_many = pytest.mark.slow(settings(
    max_examples=3000, deadline=None, database=None)(given(**EXAMPLE)(check_round_trip)))
