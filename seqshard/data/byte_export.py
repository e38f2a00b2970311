"""The byte tokenizer as Hugging Face tokenizer files, so an export of a ``data.tokenizer: byte``
run carries the tokenizer it trained with (``seqshard export``).

Ids 0-255 are the UTF-8 bytes (data/tokenizer.py), 256-258 BOS, EOS, PAD. ``tokenizers``' byte-level
pre-tokenizer maps each byte to one printable character (the GPT-2 byte-to-character table), so
a BPE model without merges whose vocabulary lists those characters in byte order encodes text to
exactly the byte ids; ``tokenizer_config.json`` names BOS/EOS/PAD.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import tokenizer as byte


def byte_characters() -> list[str]:
    """The byte-level character of each byte 0..255: printable Latin-1 bytes stand for themselves,
    the others take code points from 256 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_byte_tokenizer(out) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` of the byte tokenizer into folder ``out``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(byte_characters())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    assert [tok.token_to_id(t) for t in specials] == [byte.BOS_ID, byte.EOS_ID, byte.PAD_ID]
    out = Path(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
