"""``data.tokenizer: byte | PATH``: the byte tokenizer or a local Hugging Face tokenizer folder.

A folder's ``tokenizer.json`` is read with ``tokenizers`` (no transformers, no download); BOS and
EOS come from the folder's ``tokenizer_config.json`` / ``special_tokens_map.json`` when it names
them. A folder without ``tokenizer.json`` goes through ``transformers.AutoTokenizer``
(``local_files_only``), with the tokenizer's own BOS/EOS. Every document is encoded ``[BOS] + ids + [EOS]`` (each only if the tokenizer has it).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from . import tokenizer as byte


class TokenizerError(ValueError):
    """A tokenizer folder seqshard cannot use; the message names the path."""


class ByteTokenizer:
    vocab_size, bos_id, eos_id, pad_id = byte.VOCAB_SIZE, byte.BOS_ID, byte.EOS_ID, byte.PAD_ID

    def encode(self, text: str) -> list[int]:
        return byte.encode(text)

    def encode_plain(self, text: str) -> list[int]:
        return byte.encode(text)[1:-1]


def _special(folder: Path, name: str):
    """The token string of ``bos_token`` / ``eos_token`` / ``pad_token`` in the folder's configs."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / file
        if path.is_file():
            value = json.loads(path.read_text()).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


class HFTokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer

        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (a local Hugging Face tokenizer folder)")
        self._tok = Tokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = {}
        for name in ("bos_token", "eos_token", "pad_token"):
            token = _special(folder, name)
            ids[name] = None if token is None else self._tok.token_to_id(token)
            if token is not None and ids[name] is None:
                raise TokenizerError(f"{path}: {name} {token!r} is not in the vocabulary")
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id = next((i for i in (ids["pad_token"], self.eos_id) if i is not None), 0)

    def encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids + (
            [self.eos_id] if self.eos_id is not None else [])


class AutoTokenizerFolder:
    """A folder without ``tokenizer.json`` (e.g. ``vocab.json`` + ``merges.txt`` or a SentencePiece
    ``tokenizer.model``): ``transformers.AutoTokenizer`` with ``local_files_only``; BOS/EOS/PAD are
    the tokenizer's own (its config decides them)."""

    def __init__(self, path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError(f"{path}: no tokenizer.json, and reading other tokenizer files needs "
                                 "transformers: pip install 'seqshard[hf]'") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TokenizerError(f"{path}: not a tokenizer folder (no tokenizer.json; AutoTokenizer: {first})") from None
        self.vocab_size = len(self._tok)
        self.bos_id, self.eos_id = self._tok.bos_token_id, self._tok.eos_token_id
        self.pad_id = next((i for i in (self._tok.pad_token_id, self.eos_id) if i is not None), 0)

    def encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        return ([self.bos_id] if self.bos_id is not None else []) + ids + (
            [self.eos_id] if self.eos_id is not None else [])


@lru_cache(maxsize=8)
def load_tokenizer(name: str = "byte"):
    """``byte`` or a local tokenizer folder (cached per process: datasets map workers reuse it):
    its ``tokenizer.json`` through ``tokenizers``, else ``transformers.AutoTokenizer``."""
    if name == "byte":
        return ByteTokenizer()
    if not Path(name).is_dir():
        raise TokenizerError(f"{name}: not a folder (byte, or a local Hugging Face tokenizer folder)")
    return HFTokenizer(name) if (Path(name) / "tokenizer.json").is_file() else AutoTokenizerFolder(name)
