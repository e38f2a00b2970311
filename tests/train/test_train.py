"""End-to-end training on real gloo groups: determinism, layout independence, resume."""
import os
import shutil
import subprocess
import sys

import pytest

from seqshard.launch.launchers import tool_path
from tests.helpers.ranks import run_ranks
from tests.helpers.training import ROOT, SMALL, assert_losses_close, read_metrics, train_rank

METRIC_KEYS = {"step", "loss", "tokens", "lr", "grad_norm", "step_time_s", "tokens_per_s", "peak_mem_mb"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process loss trajectory of the small spec."""
    out = tmp_path_factory.mktemp("ref")
    return run_ranks(1, train_rank, str(out), [])[0], out


def test_single_process_run_writes_metrics_and_learns(reference):
    losses, out = reference
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert METRIC_KEYS <= set(rows[0])
    assert rows[0]["tokens"] == 1024
    assert losses[-1] < losses[0] - 0.3, losses
    assert (out / "checkpoints" / "step_5" / "COMPLETE").is_file()


def test_same_spec_same_losses_twice(reference, tmp_path):
    again = run_ranks(1, train_rank, str(tmp_path), [])[0]
    assert again == reference[0]


def test_dp2_reproduces_single_process(reference, tmp_path):
    losses = run_ranks(2, train_rank, str(tmp_path), [])
    assert losses[0] == losses[1]
    assert_losses_close(losses[0], reference[0])


def test_gradient_accumulation_reproduces_single_process(reference, tmp_path):
    """micro_batch_tokens = one row: 4 micro-batches per step on one rank, same loss."""
    losses = run_ranks(1, train_rank, str(tmp_path), ["data.micro_batch_tokens=256"])[0]
    assert_losses_close(losses, reference[0])


def test_resume_gives_the_uninterrupted_losses(reference, tmp_path):
    first = run_ranks(2, train_rank, str(tmp_path), [], {"stop_after": 3})[0]
    assert len(first) == 3
    rest = run_ranks(2, train_rank, str(tmp_path), [], {"resume": True})[0]
    assert_losses_close(first + rest, reference[0])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_checkpoint_killed_mid_save_is_skipped(reference, tmp_path):
    """A process killed while writing step 4's checkpoint leaves step 2 as the newest complete one."""
    env = dict(os.environ, SEQSHARD_TEST_CRASH_DURING_SAVE="4", OMP_NUM_THREADS="1")
    args = [f"--set={o}" for o in SMALL + [f"train.output_dir={tmp_path}", "train.checkpoint_every=2"]]
    crashed = subprocess.run([sys.executable, "-m", "seqshard", "train", str(ROOT / "examples/tiny.yaml"), *args],
                             env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == [".partial_step_4", "step_2"], ckpts
    from seqshard.dist.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path).name == "step_2"
    resumed = run_ranks(1, train_rank, str(tmp_path), ["train.checkpoint_every=2"], {"resume": True})[0]
    assert_losses_close(resumed, reference[0][2:])
    shutil.rmtree(tmp_path / "checkpoints")


def test_torchrun_and_mpirun_match_single_process(reference, tmp_path):
    """The same spec under ``torchrun`` and ``mpirun`` (2 ranks) gives the single-process losses."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    common = [str(ROOT / "examples/tiny.yaml")] + [f"--set={o}" for o in SMALL]
    runs = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                     "--standalone", "-m", "seqshard", "train"],
        "mpirun": [tool_path("mpirun"), "-np", "2", "--oversubscribe", sys.executable, "-m", "seqshard", "train"],
    }
    for name, cmd in runs.items():
        out = tmp_path / name
        proc = subprocess.run(cmd + common + [f"--set=train.output_dir={out}"], env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        assert_losses_close([r["loss"] for r in read_metrics(out)], reference[0])
