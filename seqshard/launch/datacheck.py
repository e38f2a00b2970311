"""Data checks that need no process group: the source exists, is readable and holds a document
with the configured text field (peeking at the first rows of the first file only), and the
tokenizer's vocabulary fits ``model.vocab_size``. Each failure is one :class:`SpecError`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .spec import SpecError

SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
_PEEK_BYTES = 1 << 20  # a JSON array file up to this size is parsed whole to find a row


def tokenizer_vocab_size(data) -> int | None:
    """The vocabulary size of ``data.tokenizer`` (``byte`` when the field is absent); None when
    it cannot be known before the run. Extend here for tokenizer folders."""
    name = getattr(data, "tokenizer", "byte")
    if name == "byte":
        from seqshard.data.tokenizer import VOCAB_SIZE

        return VOCAB_SIZE
    return None


def check_vocab(spec) -> None:
    need = tokenizer_vocab_size(spec.data)
    if need is not None and spec.model.vocab_size < need:
        raise SpecError("model.vocab_size", f"{spec.model.vocab_size} is smaller than the vocabulary of "
                        f"data.tokenizer {getattr(spec.data, 'tokenizer', 'byte')!r} ({need}); set it to >= {need}")


def _data_files(source: str, at: str = "data") -> list[Path]:
    path = Path(source)
    if not path.exists():
        raise SpecError(f"{at}.source", f"{source} does not exist (a file or folder of "
                        f"{' '.join(SUFFIXES)}, or stdlib)")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise SpecError(f"{at}.source", f"{source} is not readable by this user")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise SpecError(f"{at}.source", f"{source}: unsupported file type {path.suffix!r}; "
                            f"use one of {' '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise SpecError(f"{at}.source", f"no {'/'.join(SUFFIXES)} files under {source}")
    return files


def _first_json_row(file: Path):
    """The first row of a JSON-lines file (or of a small JSON array file), or None if empty."""
    with open(file, "rb") as f:
        head = f.read(_PEEK_BYTES)
    text = head.decode("utf-8", errors="replace").lstrip()
    if not text:
        return None
    if text[0] == "[":
        if file.stat().st_size > _PEEK_BYTES:
            return ...  # a large array file: not peeked
        rows = json.loads(text)
        return rows[0] if rows else None
    with open(file, "rb") as f:  # JSON lines: the whole first non-empty line, however long
        line = b""
        while not line.strip():
            line = f.readline()
            if not line:
                return None
    return json.loads(line)


def _check_first_file(file: Path, field: str, at: str = "data") -> None:
    key = f"{at}.source" if file.suffix == ".txt" else f"{at}.text_field"
    try:
        if file.suffix == ".txt":
            with open(file, "rb") as f:
                f.read(1)
            return
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(file)
            names, rows = meta.schema_arrow.names, meta.metadata.num_rows
            if rows == 0:
                raise SpecError(f"{at}.source", f"{file} holds no rows")
            if field not in names:
                raise SpecError(key, f"'{field}' is not a column of {file} (columns: {names})")
            return
        row = _first_json_row(file)
    except SpecError:
        raise
    except (OSError, ValueError) as err:
        raise SpecError(f"{at}.source", f"{file} cannot be read: {type(err).__name__}: {err}") from err
    if row is None:
        raise SpecError(f"{at}.source", f"{file} holds no rows")
    if row is not ... and (not isinstance(row, dict) or not isinstance(row.get(field), str)):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise SpecError(key, f"the first row of {file} has no text field '{field}' (found {found})")


def _check_not_empty(source: str, files: list[Path], at: str = "data") -> None:
    """Text files that hold nothing but white space would train on BOS/EOS tokens alone."""
    if any(f.suffix != ".txt" for f in files):
        return  # JSON / parquet: rows are counted when the corpus is read (DataError: no documents)
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return
    raise SpecError(f"{at}.source", f"{source} holds no text (every .txt file is empty or white space)")


def _check_saved(source: str, split: str, field: str, at: str = "data") -> None:
    """A ``save_to_disk`` folder: the split exists and its features (dataset_info.json) hold the
    text field as a string column; no Arrow file is opened."""
    from seqshard.data.saved import saved_kind, split_error

    folder = Path(source)
    if saved_kind(source) == "dict":
        error = split_error(source, split)
        if error:
            raise SpecError(f"{at}.split", error)
        folder = folder / split
    try:
        features = json.loads((folder / "dataset_info.json").read_text()).get("features") or {}
    except (OSError, ValueError) as err:
        raise SpecError(f"{at}.source", f"{folder}/dataset_info.json cannot be read: {err}") from None
    column = features.get(field)
    if not isinstance(column, dict) or column.get("dtype") not in ("string", "large_string"):
        raise SpecError(f"{at}.text_field", f"'{field}' is not a text column of {folder} "
                        f"(columns: {sorted(features)})")


def check_data(spec) -> None:
    from seqshard.data.saved import saved_kind

    d = spec.data
    if d.num_proc < 1:
        raise SpecError("data.num_proc", f"must be >= 1, got {d.num_proc}")
    from .sources_spec import check_sources, source_paths

    check_sources(spec)
    for at, src in source_paths(d):
        check_source(src, at)
    check_vocab(spec)


def check_source(src, at: str) -> None:
    """One source (data/sources.py ``Source``) whose keys sit at key path ``at``."""
    from seqshard.data.saved import saved_kind

    if src.format != "text":
        _check_format(src, at)
    elif src.source != "stdlib" and saved_kind(src.source):
        _check_saved(src.source, src.split, src.text_field, at)
    elif src.source != "stdlib":
        files = _data_files(src.source, at)
        _check_first_file(files[0], src.text_field, at)
        _check_not_empty(src.source, files, at)


def _check_format(src, at: str) -> None:
    """``format: chat | prompt_completion``: the columns exist; a chat source's first row holds
    messages with known roles (later rows are checked when tokenized, DataError naming the row)."""
    from seqshard.data.chat import FORMAT_COLUMNS, ChatError, check_messages
    from seqshard.data.saved import saved_kind

    if src.source == "stdlib":
        raise SpecError(f"{at}.format", f"{src.format} needs a dataset with {'/'.join(FORMAT_COLUMNS[src.format])} columns, not stdlib")
    if saved_kind(src.source):
        folder = Path(src.source)
        if saved_kind(src.source) == "dict":
            from seqshard.data.saved import split_error

            if split_error(src.source, src.split):
                raise SpecError(f"{at}.split", split_error(src.source, src.split))
            folder = folder / src.split
        columns = sorted(json.loads((folder / "dataset_info.json").read_text()).get("features") or {})
        row, file = None, folder
    else:
        file = _data_files(src.source, at)[0]
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            columns, row = pq.ParquetFile(file).schema_arrow.names, None
        elif file.suffix == ".txt":
            raise SpecError(f"{at}.format", f"{src.format} reads JSON / parquet / save_to_disk rows, not text files ({file})")
        else:
            row = _first_json_row(file)
            columns = sorted(row) if isinstance(row, dict) else []
    for column in FORMAT_COLUMNS[src.format]:
        if column not in columns:
            raise SpecError(f"{at}.format", f"{src.format} reads a '{column}' column; {file} has none (columns: {columns})")
    if src.format == "chat" and isinstance(row, dict):
        try:
            check_messages(row["messages"])
        except ChatError as err:
            raise SpecError(f"{at}.format", f"{file} row 1: {err}") from None
