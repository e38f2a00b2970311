"""``seqshard train`` on imported MoE checkpoints: every layout reproduces the single-process loss
trajectory over 5 steps (relative 1e-4, the load-balancing loss included), reports the same
``aux_loss`` (relative 1e-4) and the same first-step ``expert_load``."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.helpers.hf_models import save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.helpers.training import assert_losses_close  # noqa: E402
from tests.train.test_hf_wrap_train import write_docs  # noqa: E402


def spec_raw(folder, out, sp_method="none", sp=1, softmax_method="allgather", steps=5, engine="torch"):
    docs = str(__import__("pathlib").Path(folder).parent / "docs.jsonl")
    return {"model": {"hf": folder}, "seed": 0,
            "data": {"source": docs, "max_seq_len": 64, "tokens_per_step": 256},
            "parallel": {"sp": sp, "sp_method": sp_method, "softmax_method": softmax_method},
            "train": {"steps": steps, "warmup_steps": 1, "lr": 1e-2, "log_every": 100, "checkpoint_every": 0,
                      "output_dir": out, "engine": engine}}


def train_moe_rank(rank, world, folder, out, sp_method, sp, softmax_method="allgather", engine="torch"):
    from seqshard.launch.spec import from_dict
    from seqshard.train.trainer import train

    history = train(from_dict(spec_raw(folder, out, sp_method, sp, softmax_method, engine=engine), world))
    return [(m["loss"], m["aux_loss"], m["expert_load"]) for m in history]


def _check(tmp_path, family, layouts):
    folder = tmp_path / "hf"
    save_hf_model(family, folder)
    write_docs(tmp_path / "docs.jsonl", n=30)
    ref = run_ranks(1, train_moe_rank, str(folder), str(tmp_path / "one"), "none", 1)[0]
    assert all(0 < aux for _, aux, _ in ref)
    for world, sp_method, sp, softmax, *engine in layouts:
        got = run_ranks(world, train_moe_rank, str(folder), str(tmp_path / f"{sp_method}{sp}x{world}{engine}"),
                        sp_method, sp, softmax, *engine)[0]
        tag = f"{family} {sp_method} sp{sp} world{world}"
        assert_losses_close([loss for loss, _, _ in got], [loss for loss, _, _ in ref])
        assert_losses_close([aux for _, aux, _ in got], [aux for _, aux, _ in ref]), tag
        assert sum(got[0][2], []) == pytest.approx(sum(ref[0][2], [])), tag  # first step: same weights, same load


@pytest.mark.slow
def test_qwen3_moe_dp2_and_ulysses_sp2_follow_one_process(tmp_path):
    _check(tmp_path, "qwen3_moe", [(2, "none", 1, "allgather"), (2, "ulysses", 2, "allgather")])


def test_minimax_lasp2_sp2_follows_one_process(tmp_path):
    _check(tmp_path, "minimax", [(2, "lasp2", 2, "allgather")])
    check_export(tmp_path)


def check_export(tmp_path):
    """``seqshard export`` of the trained one-process run loads in transformers with seqshard's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from seqshard.launch.export import export
    from seqshard.models import VarlenContext, from_hf
    from tests.helpers.hf_models import assert_rel_close

    export(tmp_path / "one", tmp_path / "exported")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", attn_implementation="eager",
                                                dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager", dtype=torch.float32)
    doc = torch.randint(0, 259, (40,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = back(input_ids=doc[None]).logits[0]
        got = from_hf(tmp_path / "exported")(doc, torch.arange(40), VarlenContext.from_lengths([40]))
        assert (ref - initial(input_ids=doc[None]).logits[0]).abs().max() > 1e-3  # the trained weights
    assert_rel_close("exported logits", got, ref)


@pytest.mark.slow
def test_more_layouts_follow_one_process(tmp_path):
    _check(tmp_path / "m", "mixtral", [(2, "ring", 2, "allgather"), (2, "none", 1, "allgather", "fsdp2")])
    _check(tmp_path / "x", "minimax", [(4, "lasp2", 4, "allgather"), (4, "lasp1", 4, "ulysses"),
                                      (4, "lasp2", 2, "allgather")])


def native_moe_rank(rank, world, out, extra):
    from seqshard.train.trainer import train
    from tests.helpers.training import small_spec

    history = train(small_spec(out, world, [
        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_dim=64", "model.moe.aux_loss_coef=0.01",
        "model.moe.score=sigmoid", "model.moe.shared_expert_ffn_dim=32", "train.steps=3"] + extra))
    return [(m["loss"], m["aux_loss"]) for m in history]


@pytest.mark.slow
def test_native_moe_spec_ring_sp2_follows_one_process(tmp_path):
    """``model.moe`` on seqshard's own llama (sigmoid router, shared expert) under Ring sp 2."""
    ref = run_ranks(1, native_moe_rank, str(tmp_path / "one"), [])[0]
    got = run_ranks(2, native_moe_rank, str(tmp_path / "ring"), ["parallel.sp=2", "parallel.sp_method=ring"])[0]
    assert_losses_close([x for x, _ in got], [x for x, _ in ref])
    assert_losses_close([a for _, a in got], [a for _, a in ref])


@pytest.mark.slow
def test_native_moe_deepspeed_zero3_dp2_follows_one_process(tmp_path):
    """Experts are partitioned by ZeRO-3 like any other parameter."""
    pytest.importorskip("deepspeed")
    ref = run_ranks(1, native_moe_rank, str(tmp_path / "one"), [])[0]
    got = run_ranks(2, native_moe_rank, str(tmp_path / "ds"), ["train.engine=deepspeed", "train.zero_stage=3"])[0]
    assert_losses_close([x for x, _ in got], [x for x, _ in ref])
    assert_losses_close([a for _, a in got], [a for _, a in ref])
