"""train.engine: deepspeed (real DeepSpeed engine, CPU accelerator, gloo) == train.engine: torch."""
import json

import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, train_rank

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def torch_losses(tmp_path_factory):
    return run_ranks(2, train_rank, str(tmp_path_factory.mktemp("torch")), [])[0]


@pytest.mark.parametrize("stage", [1, 3])
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
