"""Dataset decomposition into power-of-two chunks (Pouransari et al. 2024, "Dataset
Decomposition: Faster LLM Training with Variable Sequence Length Curriculum", Sec. 2.2).

A document of length ``l`` becomes ``l // max_len`` chunks of ``max_len`` followed by one chunk for
every set bit of ``l % max_len``, largest first, contiguous from the document start: with
``max_len = 8192``, ``l = 9000`` gives chunks 8192, 512, 256, 32, 8 at starts 0, 8192, 8704,
8960, 8992. Every chunk holds tokens of one document only, so a bucket of equal-length chunks
trains without padding and without attention across documents. Chunks shorter than ``min_len``
(the tail of the document, below ``min_len`` tokens) are dropped, as the paper drops sequences
below its smallest bucket, unless ``keep_remainder`` keeps them as their own smaller
power-of-two buckets (then the chunks cover every token).
"""
from __future__ import annotations

import numpy as np


def _check_power_of_two(name, value):
    if value < 1 or value & (value - 1):
        raise ValueError(f"decompose: {name} must be a power of two >= 1, got {value}")


def decompose(lengths, max_len: int, min_len: int = 1, keep_remainder: bool = False) -> dict[int, np.ndarray]:
    """Buckets of chunks: ``{chunk_len: [n, 3] int64 rows (doc, start, length)}``.

    Keys are ascending powers of two in ``[min_len, max_len]`` (below ``min_len`` too with
    ``keep_remainder``); only non-empty buckets appear. Within a bucket, chunks are ordered by
    document, then start. ``max_len`` and ``min_len`` must be powers of two.
    """
    _check_power_of_two("max_len", max_len)
    _check_power_of_two("min_len", min_len)
    if min_len > max_len:
        raise ValueError(f"decompose: min_len {min_len} must be <= max_len {max_len}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or (len(lengths) and lengths.min() < 0):
        raise ValueError("decompose: lengths must be a 1-D list of ints >= 0")
    docs = np.arange(len(lengths), dtype=np.int64)
    n_full, rest = lengths // max_len, lengths % max_len
    buckets = {}
    if n_full.sum():
        doc = np.repeat(docs, n_full)
        k = np.arange(len(doc)) - np.repeat(np.cumsum(n_full) - n_full, n_full)  # chunk number in doc
        buckets[max_len] = np.stack([doc, k * max_len, np.full(len(doc), max_len)], axis=1)
    smallest = 1 if keep_remainder else min_len
    for bit in range(max_len.bit_length() - 2, smallest.bit_length() - 2, -1):
        size = 1 << bit
        has = np.flatnonzero(rest & size)
        if len(has):
            above = (rest[has] >> (bit + 1)) << (bit + 1)  # tokens of the larger chunks before it
            start = n_full[has] * max_len + above
            buckets[size] = np.stack([has, start, np.full(len(has), size)], axis=1)
    return dict(sorted(buckets.items()))


def kept_lengths(lengths, max_len: int, min_len: int = 1, keep_remainder: bool = False) -> np.ndarray:
    """Tokens of each document that :func:`decompose` keeps (all of them with ``keep_remainder``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if keep_remainder:
        return lengths.copy()
    return lengths - (lengths % max_len) % min_len


def bucket_tokens(buckets: dict[int, np.ndarray]) -> dict[int, int]:
    """Tokens in each bucket: ``chunk_len * number of chunks``."""
    return {size: size * len(chunks) for size, chunks in buckets.items()}
