"""``model: {hf: PATH}`` without ``data.tokenizer`` uses the checkpoint folder's tokenizer (and
says so in the log); ``byte`` stays available explicitly; export writes the tokenizer the run used,
the byte tokenizer included (issue #30 item 1)."""
from __future__ import annotations

import logging

import pytest

pytest.importorskip("transformers")

from seqshard.data import tokenizer as byte  # noqa: E402
from seqshard.launch.spec import from_dict  # noqa: E402
from tests.helpers.hf_models import save_hf_model, save_tokenizer  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402


def raw(folder, out, **data):
    return {"model": {"hf": str(folder)}, "seed": 0,
            "data": {"source": "stdlib", "max_seq_len": 64, "tokens_per_step": 128, "max_documents": 8, **data},
            "train": {"steps": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "output_dir": str(out)},
            "launch": {"nproc_per_node": 1}}


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "hf"
    save_hf_model("llama", folder)
    save_tokenizer(folder)
    return folder


def test_the_checkpoint_tokenizer_is_the_default(checkpoint, tmp_path):
    assert from_dict(raw(checkpoint, tmp_path / "r"), 1).data.tokenizer == str(checkpoint)
    assert from_dict(raw(checkpoint, tmp_path / "r", tokenizer="byte"), 1).data.tokenizer == "byte"
    bare = tmp_path / "bare"
    save_hf_model("llama", bare)
    assert from_dict(raw(bare, tmp_path / "r"), 1).data.tokenizer == "byte"


def train_and_log(rank, world, spec_raw):
    from seqshard.train.trainer import train

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("seqshard").addHandler(handler)
    train(from_dict(spec_raw, world))
    return lines


def test_training_logs_and_export_writes_the_tokenizer(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from seqshard.launch.export import export

    run = tmp_path / "run"
    lines = run_ranks(1, train_and_log, raw(checkpoint, run))[0]
    assert any("data.tokenizer: the tokenizer of model.hf" in line for line in lines), lines
    export(run, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (checkpoint / "tokenizer.json").read_text()

    byte_run = tmp_path / "byte_run"
    run_ranks(1, train_and_log, raw(checkpoint, byte_run, tokenizer="byte"))
    export(byte_run, tmp_path / "byte_out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "byte_out")
    text = "héllo ✓\n\tdef f(): pass"
    assert tok.encode(text, add_special_tokens=False) == byte.encode(text)[1:-1]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (byte.BOS_ID, byte.EOS_ID, byte.PAD_ID)
