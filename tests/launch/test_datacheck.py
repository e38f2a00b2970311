"""`seqshard validate` checks the data source before any process group (issue 16, item 5)."""
from __future__ import annotations

import json

import pytest

from seqshard.launch.cli import main
from tests.helpers.training import ROOT

SPEC = str(ROOT / "examples" / "tiny.yaml")


def validate(capsys, *sets):
    rc = main(["validate", SPEC, "--world-size", "2", *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr()
    return rc, out.out + out.err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case, key, words", [
    ("missing", "data.source", "does not exist"),
    ("empty", "data.source", "holds no rows"),
    ("no_field", "data.text_field", "no text field 'text'"),
    ("bad_json", "data.source", "cannot be read"),
    ("empty_dir", "data.source", "no .txt/.json/.jsonl/.parquet files"),
])
def test_validate_rejects_unusable_data(tmp_path, capsys, case, key, words):
    source = {"missing": lambda: tmp_path / "nonexistent" / "corpus.jsonl",
              "empty": lambda: write_jsonl(tmp_path / "e.jsonl", []),
              "no_field": lambda: write_jsonl(tmp_path / "c.jsonl", [{"body": "hello"}]),
              "bad_json": lambda: (tmp_path / "b.jsonl").write_text("{not json\n") and tmp_path / "b.jsonl",
              "empty_dir": lambda: tmp_path}[case]()
    rc, out = validate(capsys, f"data.source={source}")
    assert rc == 2
    assert out.count("\n") == 1 and out.startswith(f"seqshard: error: {key}: ") and words in out, out


def test_validate_accepts_readable_data_and_checks_the_vocabulary(tmp_path, capsys):
    source = write_jsonl(tmp_path / "c.jsonl", [{"body": "hello"}, {"body": "world"}])
    rc, out = validate(capsys, f"data.source={source}", "data.text_field=body")
    assert rc == 0, out
    rc, out = validate(capsys, "model.vocab_size=100")
    assert rc == 2 and out.startswith("seqshard: error: model.vocab_size: 100") and "259" in out
