"""``data.source`` as a folder written by ``datasets``' ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Such a folder holds Arrow files and ``state.json`` (a Dataset) or ``dataset_dict.json`` (a
DatasetDict, one sub-folder per split); reading it as loose files fails, so it is recognised by
those markers and read with ``datasets.load_from_disk``. ``data.split`` picks a DatasetDict's split.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def saved_kind(source: str) -> str | None:
    """``"dataset"``, ``"dict"`` or None (not a save_to_disk folder)."""
    path = Path(source)
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def saved_splits(source: str) -> list[str]:
    """The split names a DatasetDict folder lists (no Arrow file is opened)."""
    return list(json.loads((Path(source) / "dataset_dict.json").read_text()).get("splits", []))


def split_error(source: str, split: str) -> str | None:
    """Why ``split`` (``data.split``) cannot be read from the DatasetDict folder ``source``, or None."""
    splits = saved_splits(source)
    if split not in splits:
        return f"'{split}' is not a split of {source} (splits: {', '.join(splits) or 'none'})"
    return None


def load_saved(source: str, split: str):
    """The Dataset in ``source`` (a DatasetDict's ``split``); ValueError names what is wrong."""
    import datasets

    if saved_kind(source) == "dict":
        error = split_error(source, split)
        if error:
            raise ValueError(f"data.split: {error}")
        return datasets.load_from_disk(str(Path(source) / split))
    return datasets.load_from_disk(source)


def map_cache_file(ds, cache_dir: str, *key) -> str:
    """Where the tokenized copy of a loaded-from-disk dataset is cached: under seqshard's cache,
    never inside the user's folder, named by the dataset's fingerprint and ``key`` (tokenizer,
    field, document cap), so a different tokenizer never reuses another's tokens."""
    digest = hashlib.sha256(json.dumps([ds._fingerprint, *map(str, key)]).encode()).hexdigest()[:24]
    folder = os.path.join(cache_dir, "saved_to_disk")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"tokenized-{digest}.arrow")
