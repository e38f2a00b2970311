"""ShardPlan: which tokens of a packed batch each rank of an SP group holds.

Layouts (P = group size):
- ``zigzag``: each document padded to a multiple of 2P and cut into 2P equal chunks; rank r
  holds chunks r and 2P-1-r of every document, so causal attention work is balanced.
- ``contiguous``: each document padded to a multiple of P; rank r holds chunk r of each document.
- ``stream``: the whole packed stream padded at the end to a multiple of P and cut into P
  contiguous ranges; documents may start inside a rank and cross rank boundaries (LASP).
Pad tokens sit after the real tokens of their document (or of the stream), carry label -100, and
form segments of their own, so no real token attends to them, causal or not.
Every rank holds ``local_len`` tokens. ``shard`` and ``gather`` are inverses. Pure index math.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LAYOUTS = ("zigzag", "contiguous", "stream")


@dataclass(frozen=True)
class Piece:
    """A run of one document held by one rank: doc positions ``[start, start + length)``; the
    tokens at positions >= ``real`` (the document's real length) are padding."""
    doc: int
    start: int
    length: int
    real: int

    @property
    def real_len(self) -> int:
        return max(0, min(self.length, self.real - self.start))


@dataclass
class ShardPlan:
    cu_seqlens: list[int]  # global document boundaries of the packed stream
    world: int
    layout: str
    pieces: list[list[Piece]]  # per rank, in local order
    index: np.ndarray  # [world, local_len] global token index, -1 for padding
    padded_index: np.ndarray  # [world, local_len] position in the padded global stream

    @property
    def local_len(self) -> int:
        return int(self.index.shape[1])

    @property
    def total_len(self) -> int:
        return int(self.cu_seqlens[-1])

    @classmethod
    def build(cls, cu_seqlens, world: int, layout: str = "zigzag") -> "ShardPlan":
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        cu = [int(c) for c in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
        lens = np.diff(cu)
        pieces = [[] for _ in range(world)]
        if layout == "stream":
            local = -(-cu[-1] // world)
            for r in range(world):
                a, b = r * local, (r + 1) * local
                for d, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
                    lo, hi = max(a, s), min(b, e)
                    if lo < hi:
                        pieces[r].append(Piece(d, lo - s, hi - lo, int(lens[d])))
                used = sum(p.length for p in pieces[r])
                if used < local:  # stream padding: a pad-only piece after the last document
                    pieces[r].append(Piece(len(lens), a + used - cu[-1], local - used, 0))
        else:
            n_chunks = 2 * world if layout == "zigzag" else world
            for d, length in enumerate(lens):
                chunk = -(-int(length) // n_chunks) if length else 0
                if chunk == 0:
                    continue
                for r in range(world):
                    ids = [r, n_chunks - 1 - r] if layout == "zigzag" else [r]
                    pieces[r] += [Piece(d, i * chunk, chunk, int(length)) for i in ids]
        return cls(cu, world, layout, pieces, *cls._indices(cu, world, layout, pieces))

    @staticmethod
    def _indices(cu, world, layout, pieces):
        """Global index (-1 = pad) and padded-stream position of every local token."""
        lens = np.diff(cu)
        if layout == "stream":
            padded_start = [0] * (len(lens) + 1)
            padded_start[:len(lens)] = cu[:-1]
            padded_start[len(lens)] = cu[-1]
        else:
            n_chunks = 2 * world if layout == "zigzag" else world
            padded_lens = [(-(-int(n) // n_chunks)) * n_chunks for n in lens]
            padded_start = np.concatenate([[0], np.cumsum(padded_lens)]).tolist()
        rows, prow = [], []
        for r in range(world):
            idx, pidx = [], []
            for p in pieces[r]:
                pos = np.arange(p.start, p.start + p.length)
                real = pos < p.real
                base = cu[p.doc] if p.doc < len(lens) else cu[-1]
                idx.append(np.where(real, base + pos, -1))
                pidx.append(padded_start[p.doc] + pos)
            rows.append(np.concatenate(idx) if idx else np.zeros(0, np.int64))
            prow.append(np.concatenate(pidx) if pidx else np.zeros(0, np.int64))
        local = max(len(x) for x in rows)
        assert all(len(x) == local for x in rows), f"ranks hold {[len(x) for x in rows]} tokens"
        return np.stack(rows).astype(np.int64), np.stack(prow).astype(np.int64)

    def shard(self, x: torch.Tensor, rank: int, pad_value=0) -> torch.Tensor:
        """``x`` ``[T, ...]`` (global stream) -> this rank's ``[local_len, ...]``."""
        idx = torch.from_numpy(self.index[rank]).to(x.device)
        out = x.new_full((self.local_len, *x.shape[1:]), pad_value)
        real = idx >= 0
        out[real] = x[idx[real]]
        return out

    def gather(self, x_local: torch.Tensor, group) -> torch.Tensor:
        """Inverse of ``shard``: all-gather the group's shards and drop padding -> ``[T, ...]``."""
        import torch.distributed as dist

        parts = [torch.empty_like(x_local) for _ in range(self.world)]
        dist.all_gather(parts, x_local.contiguous(), group=group)
        flat, idx = torch.cat(parts), torch.from_numpy(self.index.reshape(-1)).to(x_local.device)
        out = x_local.new_empty((self.total_len, *x_local.shape[1:]))
        out[idx[idx >= 0]] = flat[idx >= 0]
        return out

    def segments(self, rank: int) -> list[tuple[Piece, int, int]]:
        """This rank's attention segments ``(piece, local_offset, length)``: each piece's real
        tokens, then its padding as a segment of its own."""
        out, offset = [], 0
        for p in self.pieces[rank]:
            real = p.real_len
            if real:
                out.append((p, offset, real))
            if p.length - real:
                out.append((Piece(-1, 0, p.length - real, 0), offset + real, p.length - real))
            offset += p.length
        return out

    def local_cu_seqlens(self, rank: int) -> torch.Tensor:
        """int32 boundaries of this rank's segments (real runs and pad runs)."""
        lens = [n for _, _, n in self.segments(rank)]
        return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)

    def causal_work(self, rank: int) -> int:
        """Query-key pairs this rank's queries attend to under a causal mask (balance metric)."""
        return int(sum(sum(range(p.start + 1, p.start + p.real_len + 1)) for p in self.pieces[rank]))

    def mask_work(self, rank: int, mask=None) -> int:
        """Query-key pairs this rank's queries keep under ``mask`` (``seqshard.kernels.attention.masks.Mask``:
        causal with a window and / or chunks), the balance metric for windowed and chunked models;
        without a mask, :meth:`causal_work`."""
        if mask is None:
            return self.causal_work(rank)
        total = 0
        for p in self.pieces[rank]:
            pos = np.arange(p.start, p.start + p.real_len)
            lo = np.zeros_like(pos)
            if mask.left >= 0:
                lo = np.maximum(lo, pos - mask.left)
            if mask.chunk:
                lo = np.maximum(lo, pos // mask.chunk * mask.chunk)
            total += int((pos - lo + 1).sum())  # keys lo..pos, all inside the document
        return total

    def padded_doc_starts(self) -> list[int]:
        """Where each document starts in the padded global stream."""
        if self.layout == "stream":
            return list(self.cu_seqlens[:-1])
        n_chunks = 2 * self.world if self.layout == "zigzag" else self.world
        padded = [(-(-int(n) // n_chunks)) * n_chunks for n in np.diff(self.cu_seqlens)]
        return np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(int).tolist()

    def padded_cu_seqlens(self) -> list[int]:
        """Segments of the padded global stream (documents, then their padding), in padded order."""
        lens = np.diff(self.cu_seqlens)
        if self.layout == "stream":
            total = self.world * self.local_len
            bounds = list(self.cu_seqlens) + ([total] if total > self.cu_seqlens[-1] else [])
            return bounds
        n_chunks = 2 * self.world if self.layout == "zigzag" else self.world
        bounds, pos = [0], 0
        for n in lens:
            padded = (-(-int(n) // n_chunks)) * n_chunks
            if n:
                bounds.append(pos + int(n))
            if padded > n:
                bounds.append(pos + padded)
            pos += padded
        return bounds
