"""``train.stages``: every stage validated up front (one SpecError naming ``train.stages[i]...``);
a 2-stage run (length, theta and sp 1 -> sp 2 change) equals the same two runs done by hand with a
resume between them, step for step; a resume in the middle of stage 2 is exact, and so is one whose
newest checkpoint is damaged (back to the stage boundary); metrics carry ``stage``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqshard.launch.cli import main
from seqshard.launch.spec import SpecError, apply_overrides, from_dict, load_raw
from tests.helpers.ranks import run_ranks
from tests.helpers.training import ROOT, SMALL, assert_losses_close, read_metrics

STAGE0 = {"data.max_seq_len": 64, "data.tokens_per_step": 256}
STAGE1 = {"data.max_seq_len": 128, "data.tokens_per_step": 256, "model.rope_theta": 40000.0,
          "parallel.sp": 2, "parallel.sp_method": "ulysses", "train.lr": 1.0e-3}


def base_raw(output_dir, stages=True):
    raw = apply_overrides(load_raw(ROOT / "examples" / "tiny.yaml"),
                          [s for s in SMALL if not s.startswith("train.steps")]
                          + [f"train.output_dir={output_dir}", "train.checkpoint_every=0", "train.warmup_steps=2",
                             "data.max_documents=60"])
    del raw["train"]["steps"]  # the stages' sum
    if stages:
        raw["train"]["stages"] = [{"steps": 3, "set": dict(STAGE0)}, {"steps": 3, "set": dict(STAGE1)}]
    return raw


def by_hand_raw(output_dir, changes):
    """One stage's settings as an ordinary spec over the whole 6-step schedule."""
    raw = base_raw(output_dir, stages=False)
    raw["train"]["steps"] = 6
    return apply_overrides(raw, [f"{k}={v}" for k, v in changes.items()])


def forget_recorded_spec(rank, checkpoint):
    """--resume refuses a changed data.max_seq_len or model.rope_theta (train/rundir.py): to do the
    stage change by hand, the checkpoint is made one that records no spec (as an older seqshard's)."""
    import torch.distributed as dist

    if rank == 0:
        meta = Path(checkpoint) / "trainer.json"
        state = json.loads(meta.read_text())
        del state["spec"]
        meta.write_text(json.dumps(state))
    dist.barrier()


def staged_runs(rank, world, root):
    from seqshard.train.trainer import train

    out = {}
    full = train(from_dict(base_raw(f"{root}/full"), world))
    out["full"] = [m["loss"] for m in full]
    out["stage"] = [m["stage"] for m in full]
    # by hand: stage 0's spec stopped at 3, then stage 1's spec resumed from that checkpoint
    first = train(from_dict(by_hand_raw(f"{root}/hand", STAGE0), world), stop_after=3)
    forget_recorded_spec(rank, f"{root}/hand/checkpoints/step_3")
    rest = train(from_dict(by_hand_raw(f"{root}/hand", STAGE1), world), resume=True)
    out["hand"] = [m["loss"] for m in first + rest]
    # interrupted in the middle of stage 1 (after step 4), then --resume
    part = train(from_dict(base_raw(f"{root}/cut"), world), stop_after=4)
    again = train(from_dict(base_raw(f"{root}/cut"), world), resume=True)
    out["cut"] = [m["loss"] for m in part + again]
    out["cut_steps"] = [m["step"] for m in part + again]
    return out


def damaged_resume_runs(rank, world, root):
    """The newest checkpoint (step 5, stage 1) damaged: --resume falls back to stage 0's last step."""
    import torch.distributed as dist

    from seqshard.train.trainer import train

    full = train(from_dict(base_raw(f"{root}/full"), world))
    part = train(from_dict(base_raw(f"{root}/damaged"), world), stop_after=5)
    if rank == 0:
        shard = sorted((Path(root) / "damaged/checkpoints/step_5").glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:100])
    dist.barrier()
    again = train(from_dict(base_raw(f"{root}/damaged"), world), resume=True)
    return [m["loss"] for m in full], [m["loss"] for m in part[:3] + again], [m["step"] for m in again]


def test_two_stages_equal_two_runs_by_hand_and_resume_is_exact(tmp_path):
    results = run_ranks(2, staged_runs, str(tmp_path))
    assert results[0] == results[1]
    r = results[0]
    assert r["stage"] == [0, 0, 0, 1, 1, 1]
    assert_losses_close(r["full"], r["hand"], rel=1e-5)
    assert r["cut_steps"] == [1, 2, 3, 4, 5, 6]
    assert_losses_close(r["cut"], r["full"], rel=1e-5)
    rows = read_metrics(tmp_path / "cut")
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6] and [m["stage"] for m in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[3]["lr"] < rows[2]["lr"]  # stage 1's lr 1e-3 scales the same schedule
    assert max(m["seq_len_max"] for m in rows[:3]) <= 64 < max(m["seq_len_max"] for m in rows[3:])
    info = json.loads((tmp_path / "full" / "run.json").read_text())  # the last stage's layout
    assert (info["sp"], info["dp"], info["spec"]["model"]["rope_theta"]) == (2, 1, 40000.0)
    for step, theta in ((3, 10000.0), (6, 40000.0)):  # export: each checkpoint's own stage's RoPE
        assert main(["export", str(tmp_path / "full"), "--step", str(step), "--out", str(tmp_path / f"x{step}")]) == 0
        config = json.loads((tmp_path / f"x{step}" / "config.json").read_text())
        assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": theta}


def test_resume_over_a_damaged_checkpoint_goes_back_to_the_stage_boundary(tmp_path):
    full, damaged, steps = run_ranks(2, damaged_resume_runs, str(tmp_path))[0]
    assert steps == [4, 5, 6]
    assert_losses_close(damaged, full, rel=1e-5)


def test_stage_specs_apply_their_set(tmp_path):
    spec = from_dict(base_raw(tmp_path), world_size=2)
    assert spec.train.steps == 6
    s0, s1 = spec.stage_specs(2)
    assert (s0.data.max_seq_len, s0.parallel.sp, s0.model.rope_theta) == (64, 1, 10000.0)
    assert (s1.data.max_seq_len, s1.parallel.sp, s1.model.rope_theta, s1.train.lr) == (128, 2, 40000.0, 1e-3)
    assert s1.train.steps == 6 and s1.train.stages == []
    raw = base_raw(tmp_path)
    raw["model"]["rope_scaling"] = {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}
    s0, s1 = from_dict(raw, world_size=2).stage_specs(2)
    assert (s0.model.rope_scaling.seq_len, s1.model.rope_scaling.seq_len) == (64, 128)  # follows the length


def _stage_error(tmp_path, index, changes, steps=3):
    raw = base_raw(tmp_path)
    if changes is None:  # an explicit train.steps that is not the stages' sum
        raw["train"]["steps"] = steps
    if changes is not None:
        raw["train"]["stages"][index] = {"steps": steps, "set": changes}
    with pytest.raises(SpecError) as err:
        from_dict(raw, world_size=2)
    return str(err.value)


def test_bad_stages_are_one_line_naming_the_key(tmp_path):
    assert _stage_error(tmp_path, 1, {"model.dim": 32}).startswith(
        "train.stages[1].set.model.dim: cannot change between stages: the model's shape")
    assert _stage_error(tmp_path, 1, {"model.n_layers": 3}).startswith("train.stages[1].set.model.n_layers: cannot")
    assert _stage_error(tmp_path, 0, {"data.tokenizer": "x"}).startswith(
        "train.stages[0].set.data.tokenizer: cannot change between stages: the tokenizer")
    assert _stage_error(tmp_path, 1, {"model.vocab_size": 300}).startswith("train.stages[1].set.model.vocab_size")
    assert _stage_error(tmp_path, 1, {"parallel.sp": 3, "parallel.sp_method": "ring"}) == \
        "train.stages[1].set.parallel.sp: 3 does not divide world size 2"
    assert _stage_error(tmp_path, 1, {"model.rope_scaling": {"type": "yarn", "factor": 0.5,
                                                             "original_max_position_embeddings": 64}}) == \
        "train.stages[1].set.model.rope_scaling.factor: must be >= 1 (a factor below 1 shrinks the context), got 0.5"
    assert _stage_error(tmp_path, 0, {}, steps=0).startswith("train.stages[0].steps: must be an integer >= 1")
    assert _stage_error(tmp_path, 0, None, steps=10).startswith("train.steps: 10 but train.stages run 6")
    # a key the stage did not set but its settings break: the stage and the key
    assert _stage_error(tmp_path, 1, {"data.max_seq_len": 96}).startswith(
        "train.stages[1]: with its set, data.tokens_per_step: 1024 is not a multiple")


def test_bad_stage_fails_validate_with_exit_2(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("launch: {nproc_per_node: 2}\n"
                    "train: {stages: [{steps: 2, set: {data.max_seq_len: 512}},\n"
                    "                 {steps: 2, set: {data.max_seq_len: 1024}},\n"
                    "                 {steps: 2, set: {model.n_heads: 8}}]}\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.stages[2].set.model.n_heads: cannot change" in err


class FakeBuilder:
    def __init__(self, keys):
        self.state = dict.fromkeys(keys, 0)

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def test_data_state_at_a_boundary_and_inside_a_stage():
    from seqshard.train.stages import Stage, load_data_state

    stage = Stage(1, 4, 6)
    window = {"epoch": 1, "cursor": 7, "offset": 30}
    b = FakeBuilder(window)
    load_data_state(b, {"step": 3, "data": window}, stage)  # boundary: the stream continues
    assert b.state == window
    pack = {"epoch": 0, "cursor": 9, "carry": [[1, 2, 3, 4]]}
    b = FakeBuilder(pack)
    load_data_state(b, {"step": 3, "data": pack}, stage)  # the next document; leftover pieces dropped
    assert b.state == {"epoch": 0, "cursor": 9, "carry": []}
    b = FakeBuilder(["sampler"])  # decompose (or another batching): the seed's stream afresh
    load_data_state(b, {"step": 3, "data": window}, stage)
    assert b.state == {"sampler": 0}
    load_data_state(b, {"step": 5, "data": {"sampler": 3}}, stage)  # inside the stage: exact
    assert b.state == {"sampler": 3}
    with pytest.raises(RuntimeError, match="newest checkpoint that loads is step 2, of an earlier stage"):
        load_data_state(b, {"step": 2, "data": {}}, stage)


def fsdp2_stage_runs(rank, world, root):
    from seqshard.train.trainer import train

    raw = base_raw(f"{root}/full")
    raw["train"]["engine"] = "fsdp2"
    full = train(from_dict(raw, world))
    first, rest = by_hand_raw(f"{root}/hand", STAGE0), by_hand_raw(f"{root}/hand", STAGE1)
    for r in (first, rest):
        r["train"]["engine"] = "fsdp2"
    hand = train(from_dict(first, world), stop_after=3)
    forget_recorded_spec(rank, f"{root}/hand/checkpoints/step_3")
    hand += train(from_dict(rest, world), resume=True)
    return [m["loss"] for m in full], [m["loss"] for m in hand]


@pytest.mark.slow
def test_two_stages_under_fsdp2_reshard_dp2_to_sp2(tmp_path):
    """FSDP2's sharded parameters and optimizer states move from dp 2 to dp 1 x sp 2 at the boundary."""
    full, hand = run_ranks(2, fsdp2_stage_runs, str(tmp_path))[0]
    assert_losses_close(full, hand, rel=1e-5)
