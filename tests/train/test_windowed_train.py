"""Issue #29: ``seqshard train`` on a windowed checkpoint (Mistral, window 8, documents up to 64
tokens, native import): the first step's loss equals transformers alone (eager, per document) on
the same global batch, in one process, under Ring sp 2 (the window-aware exchange) and under the
adaptive planner (its groups run the window through their own method)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.helpers.hf_models import save_hf_model  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.train.test_hf_wrap_train import transformers_first_loss, write_docs  # noqa: E402


def native_spec(folder, out, sp_method, sp):
    docs = str(__import__("pathlib").Path(folder).parent / "docs.jsonl")
    return {"model": {"hf": folder}, "seed": 0,
            "data": {"source": docs, "max_seq_len": 64, "tokens_per_step": 256},
            "parallel": {"sp": sp, "sp_method": sp_method, **({"max_sp": sp} if sp_method == "adaptive" else {})},
            "train": {"steps": 1, "warmup_steps": 1, "lr": 1e-2, "log_every": 100, "checkpoint_every": 0,
                      "output_dir": out},
            "launch": {"nproc_per_node": sp}}


def train_rank(rank, world, folder, out, sp_method):
    from seqshard.launch.spec import from_dict
    from seqshard.train.trainer import train

    sp = 1 if sp_method == "none" else world
    return [m["loss"] for m in train(from_dict(native_spec(folder, out, sp_method, sp), world))]


def test_windowed_first_step_loss_equals_transformers(tmp_path):
    folder = tmp_path / "mistral"
    save_hf_model("mistral_window", folder)
    write_docs(tmp_path / "docs.jsonl")
    ref = transformers_first_loss(str(folder), str(tmp_path / "ref"))
    one = train_rank(0, 1, str(folder), str(tmp_path / "one"), "none")
    ring = run_ranks(2, train_rank, str(folder), str(tmp_path / "ring"), "ring")
    adaptive = run_ranks(2, train_rank, str(folder), str(tmp_path / "adaptive"), "adaptive")
    for tag, loss in (("one process", one[0]), ("ring sp 2", ring[0][0]), ("adaptive", adaptive[0][0])):
        assert abs(loss - ref) <= 1e-5 * abs(ref), (tag, loss, ref)
