"""Corpus loading through Hugging Face ``datasets``, tokenized and cached by ``datasets``.

Sources (``data.source``):
- ``stdlib``: the Python standard library of the running interpreter, one document per ``.py``
  file: real text with a long-tailed length distribution, present on every machine.
- a local path: a file or a folder of ``.txt`` (one document per file), ``.json`` / ``.jsonl`` /
  ``.parquet`` (one document per row, text in ``data.text_field``).
Nothing is downloaded: ``datasets`` runs offline with its packaged builders.
"""
from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from .hf_tokenizer import load_tokenizer

_BUILDER_BY_SUFFIX = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad data: the message names the file or document and why."""


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f)


def _source_files(source: str) -> tuple[str, list[str]]:
    if source == "stdlib":
        return "text", stdlib_files()
    path = Path(source)
    if not path.exists():
        raise DataError(f"data.source: {source} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _BUILDER_BY_SUFFIX)
    if not files:
        raise DataError(f"data.source: no .txt/.json/.jsonl/.parquet files under {source}")
    builders = {_BUILDER_BY_SUFFIX.get(p.suffix) for p in files}
    if None in builders or len(builders) != 1:
        raise DataError(f"data.source: {source} mixes or holds unsupported file types "
                        f"({sorted(p.suffix for p in files)[:5]}); use one of .txt .json .jsonl .parquet")
    return builders.pop(), [str(p) for p in files]


def default_cache_dir() -> str:
    return os.environ.get("SEQSHARD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "seqshard"))


def _tokenize_batch(batch, text_field, tokenizer="byte"):
    encode = load_tokenizer(tokenizer).encode
    ids = []
    for i, text in enumerate(batch[text_field]):
        if not isinstance(text, str):
            raise DataError(f"document {i} of a batch: field '{text_field}' is {type(text).__name__}, not text")
        ids.append(encode(text))
    return {"input_ids": ids, "length": [len(x) for x in ids]}


class Corpus:
    """Tokenized documents: ``lengths`` (np.int64, BOS and EOS included) and ``tokens(i)``."""

    def __init__(self, dataset):
        self._ds = dataset.with_format("numpy", columns=["input_ids"])
        self.lengths = np.asarray(dataset["length"], dtype=np.int64)

    def __len__(self):
        return len(self.lengths)

    def tokens(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._ds[int(i)]["input_ids"].astype(np.int64))

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The deterministic document order of an epoch: depends only on the seed."""
        return np.random.default_rng([seed, epoch]).permutation(len(self.lengths))


def load_corpus(source="stdlib", text_field="text", cache_dir=None, max_documents=None,
                tokenizer="byte") -> Corpus:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    builder, files = _source_files(source)
    kwargs = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
    cache = cache_dir or os.path.join(default_cache_dir(), "datasets")
    ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache, **kwargs)
    if builder == "text" and text_field != "text":
        text_field = "text"  # the text builder always names its column 'text'
    if text_field not in ds.column_names:
        raise DataError(f"data.text_field: '{text_field}' not in the columns of {source} ({ds.column_names})")
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    ds = ds.map(_tokenize_batch, batched=True, fn_kwargs={"text_field": text_field, "tokenizer": tokenizer},
                remove_columns=ds.column_names, desc="tokenizing")
    if len(ds) == 0:
        raise DataError(f"data.source: {source} holds no documents")
    return Corpus(ds)
