"""Bad data is reported by file and line/row; replaced non-UTF-8 bytes are counted per file."""
from __future__ import annotations

import pytest

from seqshard.data.corpus import DataError, load_corpus


def test_row_without_text_is_named_by_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n\n{"text": null}\n')
    with pytest.raises(DataError) as caught:
        load_corpus(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert str(caught.value) == f"{tmp_path / 'b.jsonl'} line 3: field 'text' is NoneType, not text"


def test_replaced_bytes_are_counted_and_reported_per_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bad.txt").write_bytes(b"hello \xff\xfe world \xc3")
    (docs / "good.txt").write_text("fine")
    lines = []
    corpus = load_corpus(str(docs), cache_dir=str(tmp_path / "cache"), warn=lines.append)
    assert corpus.replaced == {str(docs / "bad.txt"): 3}
    assert lines == [f"data: {docs / 'bad.txt'}: 3 invalid UTF-8 sequence(s) replaced by U+FFFD"]


def test_jsonl_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "x\xff"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl line 2: byte 0xff at column 12 is not UTF-8"):
        load_corpus(str(tmp_path / "c.jsonl"), cache_dir=str(tmp_path / "cache"))
