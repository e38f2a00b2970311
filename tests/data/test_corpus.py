import json

import numpy as np
import pytest
import torch

from seqshard.data.corpus import DataError, load_corpus, stdlib_files
from seqshard.data.tokenizer import BOS_ID, EOS_ID, decode
from seqshard.data.window import WindowBuilder


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus("stdlib")


def test_stdlib_corpus_loads_through_datasets(stdlib):
    files = stdlib_files()
    assert len(stdlib) == len(files) > 500
    # one document per file, BOS + bytes + EOS; long-tailed lengths
    assert stdlib.lengths.max() > 20 * np.median(stdlib.lengths)
    doc = stdlib.tokens(0)
    assert doc[0] == BOS_ID and doc[-1] == EOS_ID and len(doc) == stdlib.lengths[0]
    with open(files[0], "rb") as f:
        assert decode(doc[1:-1]) == f.read().decode("utf-8", errors="replace")


def test_document_order_depends_only_on_seed(stdlib):
    assert np.array_equal(stdlib.order(3, 0), stdlib.order(3, 0))
    assert not np.array_equal(stdlib.order(3, 0), stdlib.order(4, 0))
    assert sorted(stdlib.order(3, 1)) == list(range(len(stdlib)))


def test_windows_never_mix_documents(stdlib):
    b = WindowBuilder(stdlib, 512, 4096, seed=0)
    for _ in range(3):
        batch = b.next_batch()
        for row in batch.rows:
            assert len(row) == 512 and sum(row.doc_lens) == 512
            start = 0
            for n in row.doc_lens:  # positions restart, labels stay inside the piece
                assert torch.equal(row.positions[start:start + n], torch.arange(n))
                assert torch.equal(row.labels[start:start + n - 1], row.tokens[start + 1:start + n])
                assert row.labels[start + n - 1] == -100
                start += n


def test_window_stream_covers_documents_in_order_and_resumes(stdlib):
    b = WindowBuilder(stdlib, 256, 1024, seed=1)
    first = b.next_batch()
    state = b.state_dict()
    second = b.next_batch()
    stream = torch.cat([r.tokens for r in first.rows + second.rows])
    order = stdlib.order(1, 0)
    expected = torch.cat([stdlib.tokens(i) for i in order[:50]])[:len(stream)]
    assert torch.equal(stream, expected)
    again = WindowBuilder(stdlib, 256, 1024, seed=1)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(again.next_batch().rows, second.rows))


def test_local_jsonl_and_txt_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello"}) + "\n" + json.dumps({"body": "wörld"}) + "\n")
    c = load_corpus(str(tmp_path / "a.jsonl"), text_field="body", cache_dir=str(tmp_path / "cache"))
    assert len(c) == 2 and decode(c.tokens(1)[1:-1]) == "wörld"
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(f"document {i}\nline two\n")
    c = load_corpus(str(docs), cache_dir=str(tmp_path / "cache"))
    assert sorted(decode(c.tokens(i)[1:-1]) for i in range(3))[0] == "document 0\nline two\n"


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match="'body' not in the columns"):
        load_corpus(str(tmp_path / "a.jsonl"), text_field="body", cache_dir=str(tmp_path / "c"))
