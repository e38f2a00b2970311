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
from .saved import load_saved, map_cache_file, saved_kind

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


class _BadRow(Exception):
    """A row without text; ``index`` is its row number in the whole dataset."""

    def __init__(self, index: int, reason: str):
        super().__init__(index, reason)  # both in args: pickled back from num_proc workers
        self.index, self.reason = index, reason


def _tokenize_batch(batch, indices, text_field, tokenizer="byte"):
    encode = load_tokenizer(tokenizer).encode
    ids = []
    for index, text in zip(indices, batch[text_field]):
        if not isinstance(text, str):
            raise _BadRow(index, f"field '{text_field}' is {type(text).__name__}, not text")
        ids.append(encode(text))
    # U+FFFD marks bytes that were not UTF-8 (the text builder reads with errors="replace")
    return {"input_ids": ids, "length": [len(x) for x in ids],
            "replaced": [t.count("\ufffd") for t in batch[text_field]]}


def _tokenize_formatted(batch, indices, fmt, tokenizer, loss_on):
    """``format: chat | prompt_completion`` rows -> signed ids (data/chat.py)."""
    from .chat import ChatError, chat_tokenizer, encode_chat, encode_prompt_completion, signed

    ids = []
    for k, index in enumerate(indices):
        try:
            if fmt == "chat":
                tokens, target = encode_chat(chat_tokenizer(tokenizer), batch["messages"][k], loss_on)
            else:
                tok = load_tokenizer(tokenizer)
                tokens, target = encode_prompt_completion(tok.encode_plain, tok.bos_id, tok.eos_id,
                                                          batch["prompt"][k], batch["completion"][k])
        except ChatError as err:
            raise _BadRow(index, str(err)) from None
        ids.append(signed(tokens, target))
    return {"input_ids": ids, "length": [len(x) for x in ids], "replaced": [0] * len(ids)}


def _rows_per_file(builder: str, files: list[str]) -> list[list[int]]:
    """For each file, the 1-based line (jsonl) or row number of each of its dataset rows."""
    import json

    out = []
    for file in files:
        if builder == "text":
            out.append([1])
        elif builder == "parquet":
            import pyarrow.parquet as pq

            out.append(list(range(1, pq.ParquetFile(file).metadata.num_rows + 1)))
        else:
            with open(file, "rb") as f:
                head = f.read(1).lstrip()
                f.seek(0)
                if head == b"[":
                    out.append(list(range(1, len(json.load(f)) + 1)))
                else:
                    out.append([n for n, line in enumerate(f, 1) if line.strip()])
    return out


def locate_rows(builder: str, files: list[str], indices) -> list[tuple[str, str]]:
    """``(file, "line N" | "row N")`` of each dataset row index (files are read in order)."""
    per_file = _rows_per_file(builder, files)
    starts = np.cumsum([0] + [len(r) for r in per_file])
    unit = "line" if builder == "json" else "row"
    out = []
    for index in indices:
        f = int(np.searchsorted(starts, index, side="right")) - 1
        f = min(f, len(files) - 1)
        rows = per_file[f]
        k = index - int(starts[f])
        out.append((files[f], f"{unit} {rows[k]}" if k < len(rows) else f"{unit} ?"))
    return out


def _first_invalid_utf8(files: list[str]) -> str:
    """Where the first byte that is not UTF-8 sits: ``file line N: ...`` (error path only)."""
    for file in files:
        with open(file, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    return (f"{file} line {n}: byte 0x{line[err.start]:02x} at column {err.start + 1} is not "
                            "UTF-8; re-encode the file as UTF-8")
    return f"{files[0]}: text that is not UTF-8"


def replaced_per_file(builder: str, files: list[str], replaced) -> dict[str, int]:
    """Replacement characters counted per source file (only the rows that have any are located)."""
    replaced = np.asarray(replaced, dtype=np.int64)
    rows = np.nonzero(replaced)[0]
    counts: dict[str, int] = {}
    if len(rows):
        for (file, _), n in zip(locate_rows(builder, files, rows.tolist()), replaced[rows].tolist()):
            counts[file] = counts.get(file, 0) + n
    return counts


class Corpus:
    """Tokenized documents: ``lengths`` (np.int64, BOS and EOS included) and ``tokens(i)``."""

    def __init__(self, dataset):
        self._ds = dataset.with_format("numpy", columns=["input_ids"])
        self.lengths = np.asarray(dataset["length"], dtype=np.int64)
        self.replaced: dict[str, int] = {}  # invalid UTF-8 sequences replaced, per source file

    def __len__(self):
        return len(self.lengths)

    def tokens(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._ds[int(i)]["input_ids"].astype(np.int64))

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The deterministic document order of an epoch: depends only on the seed."""
        return np.random.default_rng([seed, epoch]).permutation(len(self.lengths))


def _read_source(source: str, split: str, cache: str):
    """(dataset, builder, files): a ``save_to_disk`` folder (builder ``saved``) or loose files."""
    import datasets

    if saved_kind(source):
        try:
            return load_saved(source, split), "saved", [source]
        except (ValueError, OSError) as err:
            raise DataError(str(err) if str(err).startswith("data.") else f"data.source: {source}: {err}") from None
    builder, files = _source_files(source)
    kwargs = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache, **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:  # e.g. files with different columns
        cause = err.__cause__ or err
        raise DataError(f"data.source: {source} cannot be read: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}") from None
    return ds, builder, files


PROGRESS_MIN_DOCUMENTS = 2000


def load_corpus(source="stdlib", text_field="text", cache_dir=None, max_documents=None, warn=None,
                tokenizer="byte", split="train", num_proc=1, progress=False, fmt="text",
                loss_on="assistant") -> Corpus:
    """The tokenized corpus; a row without text raises DataError naming its file and line or row.
    ``warn(line)`` (rank 0's logger) receives one line per file whose invalid UTF-8 was replaced.
    ``tokenizer``: ``byte`` or a local Hugging Face tokenizer folder. ``source`` may be a
    ``save_to_disk`` folder (``split`` picks a DatasetDict's split). Tokenization is cached by
    ``datasets``, runs in ``num_proc`` processes, with a progress bar when ``progress`` (rank 0).
    ``fmt``: ``text``, or ``chat`` / ``prompt_completion`` (data/chat.py; ``loss_on`` for chat)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    cache = cache_dir or os.path.join(default_cache_dir(), "datasets")
    ds, builder, files = _read_source(source, split, cache)
    if builder == "text" and text_field != "text":
        text_field = "text"  # the text builder always names its column 'text'
    from .chat import FORMAT_COLUMNS

    for column in FORMAT_COLUMNS.get(fmt, (text_field,)):
        if column not in ds.column_names:
            key = "data.text_field" if fmt == "text" else f"format {fmt}"
            raise DataError(f"{key}: '{column}' not in the columns of {source} ({ds.column_names})")
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    key = (text_field,) if fmt == "text" else (fmt, loss_on)
    extra = {"cache_file_name": map_cache_file(ds, cache, tokenizer, *key)} if builder == "saved" else {}
    function, kwargs = ((_tokenize_batch, {"text_field": text_field, "tokenizer": tokenizer}) if fmt == "text" else
                        (_tokenize_formatted, {"fmt": fmt, "tokenizer": tokenizer, "loss_on": loss_on}))
    if progress and len(ds) >= PROGRESS_MIN_DOCUMENTS:  # a bar for long work only, not for a handful of rows
        datasets.enable_progress_bars()
    try:
        ds = ds.map(function, batched=True, with_indices=True, fn_kwargs=kwargs,
                    remove_columns=ds.column_names, desc="tokenizing", num_proc=num_proc if num_proc > 1 else None,
                    **extra)
    except _BadRow as bad:
        (file, where), = (locate_rows(builder, files, [bad.index]) if builder != "saved"
                          else [(source, f"{'split ' + split + ' ' if saved_kind(source) == 'dict' else ''}"
                                         f"row {bad.index + 1}")])
        raise DataError(f"{file} {where}: {bad.reason}") from None
    except UnicodeDecodeError:  # json/parquet strings are not decoded with replacement
        raise DataError(_first_invalid_utf8(files)) from None
    finally:
        datasets.disable_progress_bars()
    if len(ds) == 0:
        raise DataError(f"data.source: {source} holds no documents")
    corpus = Corpus(ds)
    loose = builder != "saved" and source != "stdlib"
    corpus.replaced = replaced_per_file(builder, files, ds["replaced"]) if loose else {}
    if warn is not None:
        for file, n in corpus.replaced.items():
            warn(f"data: {file}: {n} invalid UTF-8 sequence(s) replaced by U+FFFD")
    return corpus
