"""Byte-level tokenizer: ids 0-255 are bytes of the UTF-8 text, then BOS, EOS, PAD (vocab 259)."""
from __future__ import annotations

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str) -> list[int]:
    """``[BOS] + utf-8 bytes + [EOS]``: one document."""
    return [BOS_ID, *text.encode("utf-8", errors="replace"), EOS_ID]


def decode(ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")
