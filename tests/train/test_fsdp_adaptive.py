"""train.engine: fsdp2 under adaptive scattering, and ranks with no micro-batch at all.

FSDP2 all-gathers parameters in every forward and backward over all ranks, so every rank runs
the step's largest micro-batch count: short ranks repeat their last micro-batch at zero weight,
and a rank the step gives nothing runs a one-token padding micro-batch. The losses must still be
the single-process ones (fp32, rel 1e-4 over 5 steps).
"""
import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, read_metrics, train_rank

FSDP = ["train.engine=fsdp2"]
ADAPTIVE = ["parallel.sp_method=adaptive"]


def fsdp2_adaptive_run(tmp_path, world, data, extra):
    """fsdp2 + adaptive on ``world`` ranks: every rank's losses equal, and equal to one process on
    the same data (rel 1e-4); returns the run's metrics rows."""
    reference = run_ranks(1, train_rank, str(tmp_path / "ref"), data)[0]
    losses = run_ranks(world, train_rank, str(tmp_path / "run"), FSDP + ADAPTIVE + data + extra)
    assert all(l == losses[0] for l in losses)
    assert_losses_close(losses[0], reference)
    return read_metrics(tmp_path / "run")


def test_fsdp2_rank_without_micro_batch_pads_and_matches_single_process(tmp_path):
    """One 256-token document per step, adaptive groups of one on 2 ranks: the planner gives
    rank 1's group nothing every step; it runs a zero-weight padding micro-batch instead."""
    rows = fsdp2_adaptive_run(tmp_path, 2, ["data.tokens_per_step=256"], ["parallel.max_sp=1"])
    assert all(0 in r["plan_tokens_per_group"] for r in rows), [r["plan_tokens_per_group"] for r in rows]


@pytest.mark.slow
def test_fsdp2_adaptive_groups_of_two_with_uneven_micro_batch_counts(tmp_path):
    """4 ranks, groups of 2 (Ulysses) holding 512 and 256 tokens with 256-token micro-batches:
    group (0, 2) runs 2 micro-batches, group (2, 2) 1 and a zero-weight repeat, SP collectives
    inside each group and FSDP's all-gathers over all 4 ranks still line up."""
    rows = fsdp2_adaptive_run(tmp_path, 4, ["data.tokens_per_step=768"],
                              ["parallel.max_sp=2", "parallel.planner.memory_tokens=128"])
    assert all(r["plan_group_sizes"] == [2, 2] for r in rows), [r["plan_group_sizes"] for r in rows]
    assert any(max(r["plan_tokens_per_group"]) > 256 for r in rows)  # some group needed 2 micro-batches


@pytest.mark.slow
def test_fsdp2_adaptive_empty_group_of_two(tmp_path):
    """4 ranks, max_sp 2, one document: it runs SP in a group of two, the groups of ranks 2 and 3
    get nothing and pad locally; FSDP's all-gathers span all 4 ranks."""
    rows = fsdp2_adaptive_run(tmp_path, 4, ["data.tokens_per_step=256"],
                              ["parallel.max_sp=2", "parallel.planner.memory_tokens=128"])
    for r in rows:  # the document runs SP in a group of 2; every other group (ranks 2, 3) gets nothing
        tokens, sizes = r["plan_tokens_per_group"], r["plan_group_sizes"]
        assert sorted(tokens) == [0] * (len(tokens) - 1) + [256] and sizes[tokens.index(256)] == 2, r


def _padding_step(rank, world, output_dir, overrides):
    """The static scatter's padding micro-batch through the fsdp2 engine: forward and zero-weight
    backward on every rank (under SP: a 1-token document sharded over the group)."""
    import torch

    from seqshard.train.trainer import setup
    from tests.helpers.training import small_spec

    run = setup(small_spec(output_dir, world, FSDP + overrides))
    tokens, labels, positions, ctx, _ = run.scatter.padding()
    loss = run.engine.forward(tokens, positions, ctx, labels)
    run.engine.backward(loss * 0, last=True)
    grads = [p.grad.to_local() for p in run.engine.model.parameters() if p.grad is not None]
    return float(loss), len(grads), max(float(g.abs().max()) for g in grads if g.numel()), int(tokens.numel())


@pytest.mark.slow  # a path valid specs never reach (rows per step are a multiple of dp); ~12 s
def test_static_padding_micro_batch_under_ulysses_sp2_adds_nothing(tmp_path):
    """Every member of an SP group shares its replica's rows, so a group is empty together: its
    padding is one document of one token, sharded (rank 1 holds only shard padding). It runs the
    group's Ulysses collectives and FSDP's, and contributes zero loss and zero gradient."""
    out = run_ranks(2, _padding_step, str(tmp_path), ["parallel.sp=2", "parallel.sp_method=ulysses"])
    for loss, n_grads, max_grad, local_tokens in out:
        assert loss == 0.0 and max_grad == 0.0 and local_tokens == 1
        assert n_grads > 0  # backward reached the sharded parameters (every FSDP hook fired)
