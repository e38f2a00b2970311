"""``seqshard train`` with expert parallelism (``parallel.ep``) on imported MoE checkpoints: each
layout reproduces the single-process trajectory over 5 steps (loss and aux loss, relative 1e-4),
reports the dispatch / combine bytes, resumes mid-run into the uninterrupted trajectory (at the
same ep and at another), and exports every expert (transformers loads it with seqshard's logits)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.helpers.hf_models import save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.helpers.training import assert_losses_close  # noqa: E402
from tests.train.test_hf_wrap_train import write_docs  # noqa: E402


def ep_spec(folder, out, world, ep=1, sp_method="none", sp=1, steps=5, checkpoint_every=0):
    from seqshard.launch.spec import from_dict

    docs = str(__import__("pathlib").Path(folder).parent / "docs.jsonl")
    return from_dict({"model": {"hf": folder}, "seed": 0,
                      "data": {"source": docs, "max_seq_len": 64, "tokens_per_step": 256},
                      "parallel": {"sp": sp, "sp_method": sp_method, "ep": ep},
                      "train": {"steps": steps, "warmup_steps": 1, "lr": 1e-2, "log_every": 100,
                                "checkpoint_every": checkpoint_every, "output_dir": out}}, world)


def ep_train_rank(rank, world, folder, out, ep, sp_method="none", sp=1, stop_after=None, resume=False,
                  checkpoint_every=0):
    from seqshard.train.trainer import train

    spec = ep_spec(folder, out, world, ep, sp_method, sp, checkpoint_every=checkpoint_every)
    history = train(spec, resume=resume, stop_after=stop_after)
    return [(m["loss"], m["aux_loss"], {op: v["bytes"] for op, v in m["comm"].items()}) for m in history]


def _setup(tmp_path, family, **overrides):
    folder = tmp_path / "hf"
    save_hf_model(family, folder, **overrides)
    write_docs(tmp_path / "docs.jsonl", n=30)
    return str(folder)


def _same(got, ref, tag):
    assert_losses_close([loss for loss, _, _ in got], [loss for loss, _, _ in ref])
    assert_losses_close([aux for _, aux, _ in got], [aux for _, aux, _ in ref]), tag


@pytest.mark.slow
def test_qwen3_moe_ep2_follows_one_process(tmp_path):
    """ep 2 over dp 2 against one process; the dispatch and combine bytes are reported. (The default
    suite's EP training check, native MoE at world 4, is in tests/parallel/test_moe_ep.py.)"""
    folder = _setup(tmp_path, "qwen3_moe")
    ref = run_ranks(1, ep_train_rank, folder, str(tmp_path / "one"), 1)[0]
    got = run_ranks(2, ep_train_rank, folder, str(tmp_path / "ep2"), 2)[0]
    _same(got, ref, "ep2 dp2")
    comm = got[0][2]
    assert comm["moe.dispatch"] > 0 and comm["moe.combine"] > 0 and comm["moe.dispatch.bwd"] > 0, comm
    assert "moe.dispatch" not in ref[0][2]


@pytest.mark.slow
def test_ep_with_sp_and_minimax_follow_one_process(tmp_path):
    """ep 2 x Ulysses sp 2 (4 ranks: EP groups are the SP groups), ep 4 over dp 2 x sp 2 (Ring),
    Mixtral ep 2 and MiniMax (4 experts) ep 2 under LASP-2 sp 2."""
    folder = _setup(tmp_path / "q", "qwen3_moe")
    ref = run_ranks(1, ep_train_rank, folder, str(tmp_path / "q" / "one"), 1)[0]
    for world, ep, method, sp in [(4, 2, "ulysses", 2), (4, 4, "ring", 2)]:
        got = run_ranks(world, ep_train_rank, folder, str(tmp_path / "q" / f"{method}{ep}"), ep, method, sp)[0]
        _same(got, ref, f"qwen3_moe ep{ep} {method} sp{sp}")
    folder = _setup(tmp_path / "m", "mixtral")
    ref = run_ranks(1, ep_train_rank, folder, str(tmp_path / "m" / "one"), 1)[0]
    _same(run_ranks(2, ep_train_rank, folder, str(tmp_path / "m" / "ep2"), 2)[0], ref, "mixtral ep2")
    folder = _setup(tmp_path / "x", "minimax", num_local_experts=4)
    ref = run_ranks(1, ep_train_rank, folder, str(tmp_path / "x" / "one"), 1)[0]
    _same(run_ranks(2, ep_train_rank, folder, str(tmp_path / "x" / "ep2"), 2, "lasp2", 2)[0], ref, "minimax ep2")
    _same(run_ranks(2, ep_train_rank, folder, str(tmp_path / "x" / "ep2dp"), 2)[0], ref, "minimax ep2 dp2")


@pytest.mark.slow
def test_ep_resume_and_export(tmp_path):
    """Stopped after step 3 (checkpoint every 3 steps) at ep 2, resumed at ep 2: the uninterrupted
    trajectory; the same checkpoint resumed at ep 1 (dp 2) too; the export of the ep 2 run holds
    every expert and loads in transformers with seqshard's logits, equal to the one-process run's."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from seqshard.launch.export import export
    from seqshard.models import VarlenContext, from_hf
    from tests.helpers.hf_models import assert_rel_close

    folder = _setup(tmp_path, "qwen3_moe")
    ref = run_ranks(1, ep_train_rank, folder, str(tmp_path / "one"), 1, "none", 1, None, False, 3)[0]
    out = str(tmp_path / "ep2")
    first = run_ranks(2, ep_train_rank, folder, out, 2, "none", 1, 3, False, 3)[0]
    shutil.copytree(out, tmp_path / "ep1")
    rest = run_ranks(2, ep_train_rank, folder, out, 2, "none", 1, None, True, 3)[0]
    assert len(first) == 3 and len(rest) == 2
    _same(first + rest, ref, "ep2 resumed at ep2")
    other = run_ranks(2, ep_train_rank, folder, str(tmp_path / "ep1"), 1, "none", 1, None, True, 3)[0]
    _same(first + other, ref, "ep2 resumed at ep1")

    export(tmp_path / "ep2", tmp_path / "exported")
    export(tmp_path / "one", tmp_path / "exported_one")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", attn_implementation="eager",
                                                dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    doc = torch.randint(0, 259, (40,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_logits = back(input_ids=doc[None]).logits[0]
        got = from_hf(tmp_path / "exported")(doc, torch.arange(40), VarlenContext.from_lengths([40]))
        one = from_hf(tmp_path / "exported_one")(doc, torch.arange(40), VarlenContext.from_lengths([40]))
        assert (ref_logits - initial(input_ids=doc[None]).logits[0]).abs().max() > 1e-3  # the trained weights
    assert_rel_close("exported logits", got, ref_logits)
    torch.testing.assert_close(got, one, rtol=1e-3, atol=1e-3)  # the ep 2 run's weights are the one-process run's


NATIVE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_dim=64", "model.moe.aux_loss_coef=0.01",
          "model.moe.shared_expert_ffn_dim=16", "model.dim=32", "model.ffn_dim=64", "data.max_seq_len=128",
          "data.tokens_per_step=1024", "train.lr=1e-2", "train.steps=3", "data.eval.fraction=0.05"]
OPTIONS = {"ac_full": ["train.activation_checkpointing=full"],
           "ac_selective": ["train.activation_checkpointing=selective"],
           "async_checkpoint": ["train.async_checkpoint=true", "train.checkpoint_every=1"]}


def native_options_rank(rank, world, out):
    from seqshard.train.trainer import train
    from tests.helpers.training import small_spec

    return {(name, ep): [(m["loss"], m["aux_loss"], m.get("eval_loss")) for m in
                         train(small_spec(f"{out}/{name}{ep}", world, NATIVE + extra + [f"parallel.ep={ep}"]))]
            for name, extra in OPTIONS.items() for ep in (1, 2)}


@pytest.mark.slow
def test_ep_with_activation_checkpointing_and_async_checkpoints(tmp_path):
    """Recomputed blocks re-run their exchanges in backward; async DCP saves the expert DTensors."""
    runs = run_ranks(2, native_options_rank, str(tmp_path))[0]
    for name in OPTIONS:
        _same([(loss, aux, None) for loss, aux, _ in runs[name, 2]], [(loss, aux, None) for loss, aux, _ in runs[name, 1]],
              name)
        assert_losses_close([runs[name, 2][-1][2]], [runs[name, 1][-1][2]])
    assert (tmp_path / "async_checkpoint2" / "checkpoints" / "step_3" / "COMPLETE").is_file()
