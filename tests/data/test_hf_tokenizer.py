"""``data.tokenizer: PATH``: a locally trained HF tokenizer encodes the corpus with its own BOS/EOS;
a vocabulary larger than the model's is a SpecError before any process group."""
from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")

from seqshard.data.corpus import load_corpus  # noqa: E402
from seqshard.data.hf_tokenizer import load_tokenizer  # noqa: E402
from seqshard.launch.spec import SpecError, from_dict  # noqa: E402
from tests.helpers.hf_models import save_tokenizer  # noqa: E402


def test_corpus_through_hf_tokenizer(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    ours = load_tokenizer(str(tmp_path / "tok"))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2)
    text = "def f(x):\n    return x + 1\n"
    assert ours.encode(text) == [0, *tok.encode(text).ids, 1]
    corpus = load_corpus("stdlib", cache_dir=str(tmp_path / "cache"), max_documents=3,
                         tokenizer=str(tmp_path / "tok"))
    ids = corpus.tokens(0)
    assert ids[0] == 0 and ids[-1] == 1 and int(ids.max()) < ours.vocab_size
    assert len(ids) == corpus.lengths[0] and len(ids) < 0.9 * len(load_corpus(
        "stdlib", cache_dir=str(tmp_path / "cache"), max_documents=3).tokens(0))  # BPE compresses


def test_vocab_larger_than_model_is_a_spec_error(tmp_path):
    save_tokenizer(tmp_path / "tok", vocab_size=400)
    with pytest.raises(SpecError, match=r"^data.tokenizer: .*tok has 400 tokens, more than model.vocab_size 300"):
        from_dict({"model": {"vocab_size": 300}, "data": {"tokenizer": str(tmp_path / "tok")}}, world_size=1)
    with pytest.raises(SpecError, match=r"^data.tokenizer: .*nothing: not a folder"):
        from_dict({"data": {"tokenizer": str(tmp_path / "nothing")}}, world_size=1)


def test_folder_without_tokenizer_json_goes_through_autotokenizer(tmp_path):
    """vocab.json + merges.txt (a GPT-2 style folder, no tokenizer.json): AutoTokenizer with
    local_files_only reads it; same ids, BOS/EOS/PAD as the tokenizer.json of the same BPE."""
    import json

    pytest.importorskip("transformers")
    from seqshard.data.hf_tokenizer import AutoTokenizerFolder, TokenizerError

    tok = save_tokenizer(tmp_path / "fast")
    (tmp_path / "slow").mkdir()
    tok.model.save(str(tmp_path / "slow"))  # vocab.json, merges.txt
    (tmp_path / "slow" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<pad>"}))
    fast, slow = load_tokenizer(str(tmp_path / "fast")), load_tokenizer(str(tmp_path / "slow"))
    assert isinstance(slow, AutoTokenizerFolder)
    assert (slow.bos_id, slow.eos_id, slow.pad_id, slow.vocab_size) == (0, 1, 2, fast.vocab_size)
    text = "def f(x):\n    return x + 1  # done\n"
    assert slow.encode(text) == fast.encode(text)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty: not a tokenizer folder"):
        load_tokenizer(str(tmp_path / "empty"))
