import pytest
import torch
import torch.distributed as dist

from tests.helpers.ranks import run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one broke")
    return rank


def test_run_ranks_returns_per_rank_results():
    assert run_ranks(3, _sum_ranks) == [3.0, 3.0, 3.0]


def test_run_ranks_reraises_failing_rank_traceback():
    with pytest.raises(AssertionError, match="(?s)rank 1 of 2 failed.*rank one broke"):
        run_ranks(2, _fail_on_one)


def _die_on_zero(rank, world_size):
    import os

    if rank == 0:
        os._exit(3)
    dist.barrier()


def test_run_ranks_reports_a_rank_that_died_silently():
    with pytest.raises(AssertionError, match="(?s)rank 0 of 2 failed.*exited with code 3"):
        run_ranks(2, _die_on_zero, timeout=60)
