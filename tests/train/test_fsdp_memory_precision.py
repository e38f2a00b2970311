"""train.engine: fsdp2 with activation checkpointing (full, selective) and in bf16.

Activation checkpointing is applied per block before ``fully_shard`` (train/memory.py, then
train/fsdp.py): the recomputation runs inside the block's FSDP unshard, so losses must equal the
single-process run exactly as the plain fsdp2 run does (fp32, rel 1e-4 over 5 steps).

bf16 (``train.dtype: bfloat16``) computes with bf16 parameters (``MixedPrecisionPolicy.param_dtype``)
under bf16 autocast, keeps fp32 master shards and reduce-scatters fp32 gradients
(``reduce_dtype``). Its losses track the fp32 run within BF16_REL = 1e-2: bf16 keeps 8
significant bits (unit roundoff 2**-9 = 2e-3); per-token rounding errors average out over the
step's 1024 tokens (step 1, same weights: rel 1.6e-4 measured) and then grow with the weights'
drift to rel 2.4e-3 by step 4 (measured, 2 ranks, 5 steps). 1e-2 is 4x that, and below what one
step moves the fp32 loss (> 0.3 over 4 steps from ~5.5, i.e. ~1.5e-2 per step), so the tolerance
cannot hide a whole step's update.
"""
import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, small_spec, train_rank

FSDP = ["train.engine=fsdp2"]
SP2 = ["parallel.sp=2", "parallel.sp_method=ulysses"]
BF16_REL = 1e-2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_ranks(1, train_rank, str(tmp_path_factory.mktemp("ref")), [])[0]


def test_fsdp2_selective_checkpointing_ulysses_sp2_matches_single_process(reference, tmp_path):
    """Selective keeps the Ulysses attention's saved tensors; the blocks' recomputation runs
    while FSDP holds their parameters unsharded."""
    losses = run_ranks(2, train_rank, str(tmp_path), FSDP + SP2 + ["train.activation_checkpointing=selective"])
    assert losses[0] == losses[1]
    assert_losses_close(losses[0], reference)


@pytest.mark.slow
def test_fsdp2_full_checkpointing_dp2_x_ulysses2_matches_single_process(reference, tmp_path):
    overrides = FSDP + SP2 + ["train.activation_checkpointing=full", "data.micro_batch_tokens=256"]
    losses = run_ranks(4, train_rank, str(tmp_path), overrides)
    assert all(l == losses[0] for l in losses)
    assert_losses_close(losses[0], reference)


def _bf16_dtypes(rank, world, output_dir):
    """One fsdp2 bf16 step: the dtype blocks compute with, of the gradients the optimizer sees,
    and of the parameters it updates."""
    import torch

    from seqshard.train.trainer import setup, train_step

    run = setup(small_spec(output_dir, world, FSDP + ["train.dtype=bfloat16"]))
    model = run.engine.model
    seen = {}

    def before_forward(module, args):
        seen.setdefault("compute", module.weight.dtype)

    model.layers[0].mlp.w1.register_forward_pre_hook(before_forward)

    def before_step(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        seen["grads"] = sorted({str(p.grad.dtype) for p in params})
        seen["master"] = sorted({str(p.dtype) for p in params})

    run.engine.optimizer.register_step_pre_hook(before_step)
    loss = train_step(run, 1)["loss"]
    assert torch.isfinite(torch.tensor(loss)), loss
    return {"compute": str(seen["compute"]), "grads": seen["grads"], "master": seen["master"]}


def test_fsdp2_bf16_computes_in_bf16_with_fp32_master_and_gradients(tmp_path):
    seen = run_ranks(2, _bf16_dtypes, str(tmp_path))
    assert seen[0] == seen[1] == {"compute": "torch.bfloat16", "grads": ["torch.float32"],
                                  "master": ["torch.float32"]}, seen


@pytest.mark.slow
def test_fsdp2_bf16_tracks_the_fp32_losses(reference, tmp_path):
    losses = run_ranks(2, train_rank, str(tmp_path), FSDP + ["train.dtype=bfloat16"])
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0] - 0.3, losses[0]  # it learns
    rel = [abs(a - b) / b for a, b in zip(losses[0], reference)]
    print("bf16 vs fp32 relative loss differences per step:", [f"{r:.1e}" for r in rel])
    assert_losses_close(losses[0], reference, rel=BF16_REL)
