"""``model.rope_theta`` / ``model.rope_scaling`` on an HF checkpoint are overrides (the spec records
them, shape keys still conflict); bad RoPE keys are one SpecError line naming the key path; an
HF checkpoint with default RoPE + a YaRN x4 override -> 3 steps at sp 2 -> export ->
``AutoModelForCausalLM.from_pretrained`` gives seqshard's logits at the extended length."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.launch.cli import main  # noqa: E402
from seqshard.launch.spec import SpecError, from_dict  # noqa: E402
from tests.helpers.hf_models import save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402

ORIG, LONG = 16, 64
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG}


def test_rope_keys_override_the_checkpoint(tmp_path):
    save_hf_model("llama", tmp_path, max_position_embeddings=ORIG)
    m = from_dict({"model": {"hf": str(tmp_path), "rope_theta": 500000.0}}, world_size=1).model
    assert m.rope_theta == 500000.0 and m.rope_scaling.type == "none"
    m = from_dict({"model": {"hf": str(tmp_path), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
                   "data": {"max_seq_len": 128, "tokens_per_step": 256}}, world_size=1).model
    # dynamic: the checkpoint's max_position_embeddings is the original length, seq_len the training one
    assert (m.rope_scaling.type, m.rope_scaling.original_max_position_embeddings, m.rope_scaling.seq_len) == \
        ("dynamic", ORIG, 128)
    with pytest.raises(SpecError, match=r"^model.n_layers: 3 conflicts with"):
        from_dict({"model": {"hf": str(tmp_path), "rope_theta": 5e5, "n_layers": 3}}, world_size=1)


def test_bad_rope_keys_name_the_path(tmp_path):
    save_hf_model("qwen2", tmp_path)
    half = 8  # head_dim 16
    bad = {
        "model.rope_scaling.factor: must be >= 1": {"type": "linear", "factor": 0.5},
        "model.rope_scaling.original_max_position_embeddings: yarn RoPE needs": {"type": "yarn", "factor": 4.0},
        "model.rope_scaling.long_factor: has 5 numbers, head_dim 16 needs 8": {
            "type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIG,
            "short_factor": [1.0] * half, "long_factor": [1.0] * 5},
        "model.rope_scaling.type: 'ntk' is not a RoPE type": {"type": "ntk"},
        "model.rope_scaling.alpha: is not a parameter of yarn": {**YARN, "alpha": 1.0},
        "model.rope_scaling.rope_theta: is not a scaling parameter: set model.rope_theta": {**YARN, "rope_theta": 1e6},
    }
    for message, scaling in bad.items():
        for model in ({"hf": str(tmp_path)}, {"dim": 64, "n_heads": 4}):  # imported and native alike
            with pytest.raises(SpecError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
                from_dict({"model": {**model, "rope_scaling": scaling}}, world_size=1)


def test_validate_cli_exits_2_with_one_line(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("model: {rope_scaling: {type: yarn, factor: 0.5, original_max_position_embeddings: 16}}\n"
                    "launch: {nproc_per_node: 1}\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.rope_scaling.factor: must be >= 1" in err and len(err.splitlines()) == 1


def spec_raw(folder, out):
    return {"model": {"hf": folder, "rope_scaling": dict(YARN)}, "seed": 0,
            "data": {"source": "stdlib", "max_seq_len": LONG, "tokens_per_step": 4 * LONG, "max_documents": 20},
            "parallel": {"sp": 2, "sp_method": "ulysses"},
            "train": {"steps": 3, "warmup_steps": 1, "lr": 1e-2, "log_every": 100, "checkpoint_every": 3,
                      "output_dir": out},
            "launch": {"nproc_per_node": 2}}


def train_rank(rank, world, folder, out):
    from seqshard.train.trainer import train

    return [m["loss"] for m in train(from_dict(spec_raw(folder, out), world))]


def test_yarn_override_train_export_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from seqshard.models import VarlenContext, build_model

    folder, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    save_hf_model("llama", folder, max_position_embeddings=ORIG)  # default RoPE, trained at 16
    losses = run_ranks(2, train_rank, str(folder), str(run))
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": ORIG, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "truncate": True}
    assert config["max_position_embeddings"] == LONG
    assert main(["export", str(run), "--format", "torch", "--out", str(tmp_path / "pt")]) == 0

    cfg = from_dict(spec_raw(str(folder), str(run)), 2).model
    ours = build_model(cfg)
    ours.load_state_dict(torch.load(tmp_path / "pt" / "model.pt"))
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (LONG,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=tokens[None]).logits[0]
        got = ours(tokens, torch.arange(LONG), VarlenContext.from_lengths([LONG]))
    err = (got - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, f"exported logits differ at length {LONG}: rel {err:.2e}"
    (folder / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    # the trained weights with the checkpoint's default RoPE: far from the exported model
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        off = (plain(input_ids=tokens[None]).logits[0] - ref).abs().max() / ref.abs().max()
    assert off > 1e-3, f"the YaRN override changed nothing ({off:.1e})"


def test_stages_change_the_rope_of_an_hf_checkpoint(tmp_path):
    save_hf_model("llama", tmp_path, max_position_embeddings=ORIG)
    raw = {"model": {"hf": str(tmp_path)}, "launch": {"nproc_per_node": 2},
           "data": {"max_seq_len": ORIG, "tokens_per_step": 4 * LONG},
           "train": {"stages": [{"steps": 2, "set": {}},
                                {"steps": 2, "set": {"data.max_seq_len": LONG, "model.rope_scaling": YARN,
                                                     "parallel.sp": 2, "parallel.sp_method": "ring"}}]}}
    s0, s1 = from_dict(raw, world_size=2).stage_specs(2)
    assert (s0.model.rope_scaling.type, s1.model.rope_scaling.type) == ("none", "yarn")
    assert s1.model.rope_scaling.factor == 4.0
    assert s1.model.hf == str(tmp_path) and s1.parallel.sp == 2
    raw["train"]["stages"][1]["set"]["model.rope_scaling"] = {"type": "yarn", "factor": 4.0}
    key = r"model.rope_scaling.original_max_position_embeddings"
    with pytest.raises(SpecError, match=rf"^train.stages\[1\].set.{key}: "):
        from_dict(raw, world_size=2)
