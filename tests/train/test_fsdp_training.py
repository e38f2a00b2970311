"""train.engine: fsdp2 reproduces the single-process losses; checkpoints reshard across layouts
and engines (DESIGN.md invariant 3 under sharded parameters, gradients and optimizer states)."""
import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, read_metrics, train_rank

FSDP = ["train.engine=fsdp2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_ranks(1, train_rank, str(tmp_path_factory.mktemp("ref")), [])[0]


def test_fsdp2_dp2_x_ulysses2_with_accumulation(reference, tmp_path):
    """4 ranks, dp 2 x ulysses 2, 2 micro-batches per replica (256 of a replica's 512 tokens),
    parameters sharded over all 4 ranks: the single-process losses, every rank alike."""
    overrides = FSDP + ["parallel.sp=2", "parallel.sp_method=ulysses", "data.micro_batch_tokens=256"]
    losses = run_ranks(4, train_rank, str(tmp_path), overrides)
    assert all(l == losses[0] for l in losses)
    assert_losses_close(losses[0], reference)
    assert read_metrics(tmp_path)[0]["grad_norm"] > 0


SLOW_LAYOUTS = {
    "dp2": (2, []),
    "ring_sp4": (4, ["parallel.sp=4", "parallel.sp_method=ring"]),
    "dp2_no_reshard_after_forward": (2, ["train.reshard_after_forward=false"]),
    "dp2_offload_params": (2, ["train.offload_params=true"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_LAYOUTS))
def test_fsdp2_layout_reproduces_single_process(name, reference, tmp_path):
    world, overrides = SLOW_LAYOUTS[name]
    losses = run_ranks(world, train_rank, str(tmp_path), FSDP + overrides)
    assert_losses_close(losses[0], reference)


@pytest.mark.slow
def test_fsdp2_lasp2_hybrid_sp2(tmp_path):
    model = ["model.arch=hybrid", "model.layer_pattern=LA", "model.linear_attn.decay=data"]
    ref = run_ranks(1, train_rank, str(tmp_path / "ref"), model)[0]
    losses = run_ranks(2, train_rank, str(tmp_path / "run"), FSDP + model + ["parallel.sp=2",
                                                                             "parallel.sp_method=lasp2"])
    assert_losses_close(losses[0], ref)


SIX = ["train.steps=6"]
SP2 = ["parallel.sp=2", "parallel.sp_method=ulysses"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps at world 4 / dp 2 x ulysses 2 (fsdp2)."""
    return run_ranks(4, train_rank, str(tmp_path_factory.mktemp("six")), SIX + SP2 + FSDP)[0]


RESUMES = {  # first engine, resumed engine, extra keys of both halves
    "fsdp2_to_fsdp2": ("fsdp2", "fsdp2", []),
    "torch_to_torch": ("torch", "torch", []),
    "fsdp2_to_torch_async": ("fsdp2", "torch", ["train.async_checkpoint=true"]),
    "torch_to_fsdp2": ("torch", "fsdp2", []),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMES))
def test_resume_reshards_world4_sp2_to_world2_sp1(name, uninterrupted, tmp_path):
    """3 steps at world 4 / sp 2, resume at world 2 / sp 1: steps 4-6 as if uninterrupted."""
    first, second, extra = RESUMES[name]
    part = run_ranks(4, train_rank, str(tmp_path), SIX + SP2 + extra + [f"train.engine={first}"],
                     {"stop_after": 3})[0]
    rest = run_ranks(2, train_rank, str(tmp_path), SIX + extra + [f"train.engine={second}"], {"resume": True})[0]
    assert len(rest) == 3
    assert_losses_close(part + rest, uninterrupted, rel=1e-5)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


SP4 = ["parallel.sp=4", "parallel.sp_method=ulysses"]
LAYOUT_RESUMES = {  # engine, (world, keys) of the first 3 steps, (world, keys) of steps 4-6
    "fsdp2_world4_sp2_to_world4_sp4": ("fsdp2", (4, SP2), (4, SP4)),
    "torch_world4_sp2_to_world4_sp4": ("torch", (4, SP2), (4, SP4)),
    "fsdp2_world2_to_world4": ("fsdp2", (2, []), (4, [])),
    "torch_world2_to_world4": ("torch", (2, []), (4, [])),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUT_RESUMES))
def test_resume_reshards_to_more_sp_or_more_ranks(name, uninterrupted, tmp_path):
    """Resume at sp 4 (parameters resharded 4 ways, each rank holding a quarter of every
    document), or from 2 ranks onto 4: steps 4-6 equal the uninterrupted run (rel 1e-5)."""
    engine, (world1, keys1), (world2, keys2) = LAYOUT_RESUMES[name]
    common = SIX + [f"train.engine={engine}"]
    part = run_ranks(world1, train_rank, str(tmp_path), common + keys1, {"stop_after": 3})[0]
    rest = run_ranks(world2, train_rank, str(tmp_path), common + keys2, {"resume": True})[0]
    assert len(part) == len(rest) == 3
    assert_losses_close(part + rest, uninterrupted, rel=1e-5)


def test_resume_into_a_changed_model_names_the_difference_and_exits_2(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers.training import ROOT, SMALL

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "seqshard", "train", str(ROOT / "examples/tiny.yaml")]
    cmd += [f"--set={o}" for o in SMALL + [f"train.output_dir={tmp_path}", "train.steps=1"]]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = subprocess.run(cmd + ["--set=model.ffn_dim=96", "--resume"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert "model.ffn_dim: 96 differs from 128" in resumed.stderr, resumed.stderr[-2000:]  # the recorded spec
    # a checkpoint without a recorded spec (an older seqshard): the tensor shapes name the difference
    import json

    state_file = tmp_path / "checkpoints" / "step_1" / "trainer.json"
    state = json.loads(state_file.read_text())
    state.pop("spec")
    state_file.write_text(json.dumps(state))
    resumed = subprocess.run(cmd + ["--set=model.ffn_dim=96", "--resume"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert "layers.0.mlp.w1.weight is [128, 64] there, [96, 64] here" in resumed.stderr, resumed.stderr[-2000:]
