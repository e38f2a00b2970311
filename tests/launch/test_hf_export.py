"""Round trip: HF Llama + tokenizer -> train 3 steps (Ulysses sp 2, 2 gloo ranks) -> seqshard export
-> transformers from_pretrained: logits equal seqshard's own model with the checkpoint's weights."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.launch.cli import main  # noqa: E402
from tests.helpers.hf_models import save_hf_model, save_tokenizer  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402


def spec_raw(folder, tok, out):
    return {"model": {"hf": folder}, "seed": 0,
            "data": {"source": "stdlib", "tokenizer": tok, "max_seq_len": 128, "tokens_per_step": 256,
                     "max_documents": 40},
            "parallel": {"sp": 2, "sp_method": "ulysses"},
            "train": {"steps": 3, "warmup_steps": 1, "lr": 1e-2, "log_every": 100, "checkpoint_every": 3,
                      "output_dir": out},
            "launch": {"nproc_per_node": 2}}


def train_hf_rank(rank, world, folder, tok, out):
    from seqshard.launch.spec import from_dict
    from seqshard.train.trainer import train

    return [m["loss"] for m in train(from_dict(spec_raw(folder, tok, out), world))]


@pytest.mark.slow  # ~20 s CPU, 2 ranks training: see hf-note for the timing
def test_import_train_export_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from seqshard.launch.export import model_state
    from seqshard.launch.spec import from_dict
    from seqshard.models import VarlenContext, build_model

    folder, tok, run = tmp_path / "hf", tmp_path / "tok", tmp_path / "run"
    save_hf_model("llama3_scaled", folder)
    save_tokenizer(tok)
    losses = run_ranks(2, train_hf_rank, str(folder), str(tok), str(run))
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "out"),
                 "--max-shard-mb", "0.05"]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded above the limit
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert main(["export", str(run), "--format", "torch", "--out", str(tmp_path / "pt")]) == 0

    cfg = from_dict(spec_raw(str(folder), str(tok), str(run)), 2).model
    ours = build_model(cfg)
    ours.load_state_dict(torch.load(tmp_path / "pt" / "model.pt"))
    trained = model_state(run / "checkpoints" / "step_3")
    assert not torch.equal(trained["embed.weight"], build_model(cfg).embed.weight)  # training moved it
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                              dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (50,), generator=torch.Generator().manual_seed(3))
    ref = hf(input_ids=tokens[None]).logits[0]
    got = ours(tokens, torch.arange(50), VarlenContext.from_lengths([50]))
    err = (got - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, f"exported logits differ: rel {err:.2e}"


def test_export_without_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no spec.yaml" in capsys.readouterr().err
