"""``data.source`` as a ``save_to_disk`` folder (Dataset or DatasetDict, ``data.split``): read with
``load_from_disk``, tokenized into seqshard's cache (never into the user's folder), in parallel
with the same result, and checked by the spec validation before any process starts."""
from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from seqshard.data import tokenizer as byte  # noqa: E402
from seqshard.data.corpus import DataError, load_corpus  # noqa: E402
from seqshard.launch.spec import SpecError, from_dict  # noqa: E402

TRAIN = ["def f(x):\n    return x\n", "import os\n", "class A:\n    pass\n"]
VALID = ["print('held out')\n", "x = 1\n"]


def _saved(tmp_path):
    dd = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": TRAIN, "n": [1, 2, 3]}),
                              validation=datasets.Dataset.from_dict({"text": VALID, "n": [4, 5]}))
    dd.save_to_disk(str(tmp_path / "dict"))
    dd["validation"].save_to_disk(str(tmp_path / "single"))
    return str(tmp_path / "dict"), str(tmp_path / "single")


def _texts(corpus):
    return [byte.decode(corpus.tokens(i).tolist()) for i in range(len(corpus))]


def test_dataset_dict_split_and_dataset(tmp_path):
    folder, single = _saved(tmp_path)
    cache = str(tmp_path / "cache")
    assert _texts(load_corpus(folder, cache_dir=cache)) == TRAIN  # data.split defaults to train
    assert _texts(load_corpus(folder, cache_dir=cache, split="validation")) == VALID
    assert _texts(load_corpus(single, cache_dir=cache)) == VALID
    parallel = load_corpus(folder, cache_dir=str(tmp_path / "cache2"), num_proc=2)
    assert _texts(parallel) == TRAIN
    assert not list((tmp_path / "dict").rglob("cache-*")), "tokenized cache written into the user's folder"
    assert list((tmp_path / "cache").rglob("tokenized-*.arrow"))
    with pytest.raises(DataError, match=r"^data.split: 'test' is not a split of .*dict \(splits: train, validation\)"):
        load_corpus(folder, cache_dir=cache, split="test")


def test_bad_row_named_by_split_and_row(tmp_path):
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["ok", None]})).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"d split train row 2: field 'text' is NoneType, not text"):
        load_corpus(str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"))


def test_spec_validation_reads_saved_folders(tmp_path):
    folder, single = _saved(tmp_path)
    spec = from_dict({"data": {"source": folder, "split": "validation", "num_proc": 2}}, world_size=1)
    assert (spec.data.split, spec.data.num_proc) == ("validation", 2)
    from_dict({"data": {"source": single}}, world_size=1)
    with pytest.raises(SpecError, match=r"^data.split: 'test' is not a split of .*\(splits: train, validation\)"):
        from_dict({"data": {"source": folder, "split": "test"}}, world_size=1)
    with pytest.raises(SpecError, match=r"^data.text_field: 'n' is not a text column of .*train"):
        from_dict({"data": {"source": folder, "text_field": "n"}}, world_size=1)
    with pytest.raises(SpecError, match=r"^data.num_proc: must be >= 1"):
        from_dict({"data": {"source": folder, "num_proc": 0}}, world_size=1)
