"""``seqshard train`` with ``model: {hf: PATH, impl: transformers}`` (the generic wrap): on 2 gloo
ranks under Ulysses sp 2 the first step's loss equals transformers alone on the same global batch
(eager attention, one document at a time, fp32), and later steps follow the one-process run."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.hf_models import save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.helpers.training import assert_losses_close  # noqa: E402


def write_docs(path, n=12):
    """A small jsonl corpus (documents of 30 to 140 bytes: some span two windows)."""
    import json
    import random

    rng = random.Random(0)
    words = "sequence parallel attention shard rank token gradient loss ring head".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 20)))})
                            + "\n" for _ in range(n)))
    return str(path)


def spec_raw(folder, out, sp_method="ulysses", sp=2, engine="torch", steps=2):
    docs = str(__import__("pathlib").Path(folder).parent / "docs.jsonl")
    return {"model": {"hf": folder, "impl": "transformers"}, "seed": 0,
            "data": {"source": docs, "max_seq_len": 64, "tokens_per_step": 256},
            "parallel": {"sp": sp, "sp_method": sp_method},
            "train": {"steps": steps, "warmup_steps": 1, "lr": 1e-2, "log_every": 100, "checkpoint_every": 0,
                      "output_dir": out, "engine": engine},
            "launch": {"nproc_per_node": sp}}


def train_wrap_rank(rank, world, folder, out, sp_method, engine):
    from seqshard.launch.spec import from_dict
    from seqshard.train.trainer import train

    sp = 1 if sp_method == "none" else world
    return [m["loss"] for m in train(from_dict(spec_raw(folder, out, sp_method, sp, engine), world))]


def transformers_first_loss(folder, out):
    """The first step's loss by transformers alone on the batch the spec builds (initial weights)."""
    from transformers import AutoModelForCausalLM

    from seqshard.launch.spec import from_dict
    from seqshard.train.evaluate import _load_all
    from seqshard.train.trainer import build_batch_builder

    spec = from_dict(spec_raw(folder, out), 2)
    batch = build_batch_builder(spec, _load_all(spec.data)[0]).next_batch()
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for row in batch.rows:
            start = 0
            for n in row.doc_lens:
                piece = slice(start, start + n)
                logits = hf(input_ids=row.tokens[None, piece], position_ids=row.positions[None, piece]).logits[0]
                total += torch.nn.functional.cross_entropy(logits, row.labels[piece], ignore_index=-100,
                                                           reduction="sum").double()
                start += n
    return total.item() / batch.num_loss_tokens


def test_train_wrap_ulysses_matches_transformers(tmp_path):
    folder = tmp_path / "gemma"
    save_hf_model("gemma", folder)
    write_docs(tmp_path / "docs.jsonl")
    ref = transformers_first_loss(str(folder), str(tmp_path / "ref"))
    losses = run_ranks(2, train_wrap_rank, str(folder), str(tmp_path / "uly"), "ulysses", "torch")
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert abs(losses[0][0] - ref) <= 1e-5 * abs(ref), (losses[0][0], ref)
    assert losses[0][1] < losses[0][0]  # training moved the weights
    check_export_round_trip(folder, tmp_path / "uly", tmp_path / "export")


def check_export_round_trip(folder, run, out):
    """seqshard export of a wrap run writes transformers' own folder: from_pretrained gives the
    trained weights (not the initial ones) and the wrap's logits."""
    from transformers import AutoModelForCausalLM

    from seqshard.launch.cli import main
    from seqshard.launch.export import model_state
    from seqshard.models import VarlenContext
    from seqshard.models.hf_wrap import wrap_hf

    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    trained = model_state(run / "checkpoints" / "step_2")
    ours = wrap_hf(folder)
    initial = ours.hf.get_input_embeddings().weight.detach().clone()
    ours.load_state_dict(trained)
    exported = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    assert not torch.equal(exported.get_input_embeddings().weight, initial)
    tokens = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = exported(input_ids=tokens[None]).logits[0]
        got = ours(tokens, torch.arange(40), VarlenContext.from_lengths([40]))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("sp_method,engine", [("ring", "torch"), ("allgather", "torch"), ("ulysses", "fsdp2"),
                                              ("ulysses", "deepspeed")])
def test_train_wrap_layouts_match_one_process(tmp_path, sp_method, engine):
    folder = tmp_path / "phi"
    save_hf_model("phi", folder)
    write_docs(tmp_path / "docs.jsonl")
    one = run_ranks(1, train_wrap_rank, str(folder), str(tmp_path / "one"), "none", "torch", timeout=900)[0]
    two = run_ranks(2, train_wrap_rank, str(folder), str(tmp_path / "two"), sp_method, engine, timeout=900)[0]
    assert_losses_close(two, one, rel=1e-5)
