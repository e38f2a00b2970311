"""train.engine: deepspeed (real DeepSpeed engine, CPU accelerator, gloo) == train.engine: torch."""
import json

import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, train_rank

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def torch_losses(tmp_path_factory):
    return run_ranks(2, train_rank, str(tmp_path_factory.mktemp("torch")), [])[0]


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 3])  # ZeRO-1 slow: suite budget
def test_deepspeed_zero_matches_torch_engine(torch_losses, tmp_path, stage):
    overrides = ["train.engine=deepspeed", f"train.zero_stage={stage}", "train.checkpoint_every=3"]
    losses = run_ranks(2, train_rank, str(tmp_path), overrides, timeout=600)
    assert losses[0] == losses[1]
    assert_losses_close(losses[0], torch_losses)
    assert (tmp_path / "checkpoints" / "step_3" / "COMPLETE").is_file()
    engine = json.loads((tmp_path / "run.json").read_text())["engine"]  # the engine in use, as DeepSpeed reports it
    assert engine["engine"] == "deepspeed" and engine["zero_stage"] == stage and engine["precision"] == "float32"


def test_deepspeed_resume_through_engine_checkpoint(torch_losses, tmp_path):
    overrides = ["train.engine=deepspeed", "train.zero_stage=1"]
    first = run_ranks(2, train_rank, str(tmp_path), overrides, {"stop_after": 2}, timeout=600)[0]
    rest = run_ranks(2, train_rank, str(tmp_path), overrides, {"resume": True}, timeout=600)[0]
    assert_losses_close(first + rest, torch_losses)


SP2 = ["parallel.sp=2", "parallel.sp_method=ulysses"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three DeepSpeed runs: ~4 min at load 20
def test_deepspeed_zero1_resume_dp_to_ulysses(torch_losses, tmp_path):
    """Same 2 ranks, dp 2 -> ulysses sp 2: DeepSpeed's data-parallel world is all ranks in both,
    so its ZeRO-1 partitions load unchanged; the losses continue as if uninterrupted."""
    overrides = ["train.engine=deepspeed", "train.zero_stage=1"]
    first = run_ranks(2, train_rank, str(tmp_path), overrides, {"stop_after": 2}, timeout=600)[0]
    rest = run_ranks(2, train_rank, str(tmp_path), overrides + SP2, {"resume": True}, timeout=600)[0]
    assert len(rest) == 3
    assert_losses_close(first + rest, torch_losses, rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_deepspeed_zero0_resume_world2_to_world1(torch_losses, tmp_path):
    """ZeRO stage 0 saves one full optimizer copy: it resumes on 1 rank."""
    overrides = ["train.engine=deepspeed", "train.zero_stage=0"]
    first = run_ranks(2, train_rank, str(tmp_path), overrides, {"stop_after": 2}, timeout=600)[0]
    rest = run_ranks(1, train_rank, str(tmp_path), overrides, {"resume": True}, timeout=600)[0]
    assert len(rest) == 3
    assert_losses_close(first + rest, torch_losses, rel=1e-5)


@pytest.mark.slow  # a 2-rank DeepSpeed run and a DeepSpeed CLI start: ~40 s on a quiet machine
def test_deepspeed_zero1_resume_on_fewer_ranks_exits_2_before_training(tmp_path):
    """ZeRO-1 partitions of 2 ranks cannot load into 1: one line naming both sizes, exit 2,
    no step trained (DeepSpeed itself would raise mid-load)."""
    import os
    import subprocess
    import sys

    from tests.helpers.training import ROOT, SMALL, read_metrics

    overrides = ["train.engine=deepspeed", "train.zero_stage=1"]
    run_ranks(2, train_rank, str(tmp_path), overrides, {"stop_after": 1}, timeout=600)
    cmd = [sys.executable, "-m", "seqshard", "train", str(ROOT / "examples/tiny.yaml"), "--resume"]
    cmd += [f"--set={o}" for o in SMALL + overrides + [f"train.output_dir={tmp_path}"]]
    resumed = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert "ZeRO optimizer partitions of 2 ranks, this run has 1" in resumed.stderr, resumed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
