"""DCP checkpoints are complete or ignored (DESIGN.md invariant 7), on 2 real gloo ranks."""
from __future__ import annotations

import torch

from seqshard.dist.checkpoint import MARKER, checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
from tests.helpers.ranks import run_ranks


def make_model_and_optim(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optim.step()
    return model, optim


def save_then_load(rank, world_size, out):
    model, optim = make_model_and_optim(seed=0)
    save_checkpoint(out, 7, model, optim, {"step": 7, "data_position": 42})
    expected = [p.detach().clone() for p in model.parameters()]
    rng_after_save = torch.rand(3)
    fresh, fresh_optim = make_model_and_optim(seed=1)  # different weights and optimizer moments
    state = load_checkpoint(latest_checkpoint(out), fresh, fresh_optim)
    assert all(torch.equal(a, b) for a, b in zip(expected, fresh.parameters()))
    exp_avg = [optim.state[p]["exp_avg"] for p in model.parameters()]
    got_avg = [fresh_optim.state[p]["exp_avg"] for p in fresh.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(exp_avg, got_avg))
    assert torch.equal(torch.rand(3), rng_after_save), "RNG restored to its state at save time"
    return state


def test_save_load_round_trip(tmp_path):
    states = run_ranks(2, save_then_load, str(tmp_path))
    assert states == [{"step": 7, "data_position": 42}] * 2
    step_dir = checkpoint_root(tmp_path) / "step_7"
    assert (step_dir / MARKER).is_file() and (step_dir / "trainer.json").is_file()
    assert not list(checkpoint_root(tmp_path).glob(".partial_*"))


def test_latest_ignores_partial_and_unmarked(tmp_path):
    root = checkpoint_root(tmp_path)
    assert latest_checkpoint(tmp_path) is None
    for name, marked in [("step_2", True), ("step_10", True), (".partial_step_12", True), ("step_11", False)]:
        (root / name).mkdir(parents=True)
        if marked:
            (root / name / MARKER).write_text("done\n")
    assert latest_checkpoint(tmp_path) == root / "step_10"


def test_local_experts_unwraps_only_expert_entries():
    """After a DCP load, only the expert DTensors go back to local slices: FSDP2's own DTensor
    parameters and moments stay as they are (unwrapping them broke resuming FSDP2 runs)."""
    from types import SimpleNamespace

    from torch import nn

    from seqshard.dist.checkpoint import local_experts

    class Local:  # stands in for a DTensor: anything with to_local()
        def __init__(self, tag):
            self.tag = tag

        def to_local(self):
            return f"local {self.tag}"

    model = nn.Module()
    model.moe = nn.Module()
    model.moe.ep_shard = SimpleNamespace()
    model.attn = nn.Linear(2, 2)
    state = {"model": {"moe.gate_up": Local("gu"), "moe.down": Local("d"), "attn.weight": Local("w")},
             "optim": {"state": {"moe.gate_up": {"exp_avg": Local("m"), "step": 3},
                                 "attn.weight": {"exp_avg": Local("am")}}, "param_groups": []}}
    out = local_experts(model, state)
    assert out["model"]["moe.gate_up"] == "local gu" and out["model"]["moe.down"] == "local d"
    assert out["model"]["attn.weight"] is state["model"]["attn.weight"]
    assert out["optim"]["state"]["moe.gate_up"] == {"exp_avg": "local m", "step": 3}
    assert out["optim"]["state"]["attn.weight"]["exp_avg"] is state["optim"]["state"]["attn.weight"]["exp_avg"]
    assert local_experts(nn.Linear(2, 2), state) is state  # no experts: untouched
