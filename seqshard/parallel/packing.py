"""Variable-length packing of whole documents into fixed-capacity bins (no cross-contamination).

Each bin becomes one packed row (a flat token stream plus ``cu_seqlens``): documents share a row
but never attend to one another (DESIGN.md invariant 5), so packing only decides which documents
share a row. The quality measure is the number of bins against the lower bound
``ceil(total_tokens / capacity)``; ``efficiency = tokens / (bins * capacity)``.

Methods (all deterministic for a seed; the seed only breaks ties between equal lengths):

- ``bfd``: best-fit decreasing. Pieces from longest to shortest, each into the open bin with the
  least room that still fits it.
- ``ffd``: first-fit decreasing. Same order, each into the lowest-numbered bin that fits it.
- ``spfhp``: shortest-pack-first histogram packing (Krell et al. 2021, "Efficient Sequence Packing
  without Cross-contamination", Graphcore): lengths from longest to shortest over the length
  histogram, each into the shortest open pack (the one with the most room) that fits it. Two
  departures from the paper's code: pack depth is unlimited, and sequences that fit no open pack
  open packs filled as the sequential rule fills them (``capacity // length`` each) instead of
  one pack per sequence.
- ``greedy``: next-fit in the given order, the streaming baseline: a piece that does not fit the
  current bin closes it.

The decreasing methods work on the length histogram: bins are grouped by remaining room, and all
pieces of one length are placed into a group of equal bins at once (``q = room // length`` per bin
for best fit, one per bin per round for shortest-pack-first). This is exact for the sequential
algorithms (equal bins are interchangeable) and packs 1M lengths in about a second.

Splitting: a document longer than ``capacity`` is cut first into ``capacity``-sized pieces plus a
remainder (``split_pieces``). :func:`pack_pieces` returns a :class:`PackResult` whose bins hold
piece ids into ``PackResult.pieces`` (rows ``(doc, start, length)``). :func:`pack` returns bins
of document indices: a document that was split appears once per piece, and its pieces lie in
ascending bin order (every piece but the last fills a bin alone, and those bins come first), so
the k-th bin holding document d holds tokens ``[k*capacity, (k+1)*capacity)`` of it.
``restart_positions`` records whether a piece's position ids restart at 0 or continue from its
start in the document (``PackResult.position_offsets``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import numpy as np

METHODS = ("bfd", "ffd", "spfhp", "greedy")


@dataclass
class PackResult:
    """Bins of pieces, stored flat: bin ``b`` holds pieces ``order[offsets[b]:offsets[b + 1]]``.

    ``pieces`` is ``[P, 3]`` int64 rows ``(doc, start, length)``; ``bins`` gives the lists.
    """
    order: np.ndarray
    offsets: np.ndarray
    pieces: np.ndarray
    capacity: int
    restart_positions: bool = True

    @cached_property
    def bins(self) -> list[list[int]]:
        """Piece ids of each bin."""
        ids, ends = self.order.tolist(), self.offsets.tolist()
        return [ids[a:b] for a, b in zip(ends[:-1], ends[1:])]

    @property
    def num_bins(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> int:
        return int(self.pieces[:, 2].sum())

    @property
    def lower_bound(self) -> int:
        """``ceil(total_tokens / capacity)``: no packing needs fewer bins."""
        return -(-self.tokens // self.capacity)

    @property
    def efficiency(self) -> float:
        """Filled fraction of the bins: ``tokens / (bins * capacity)``."""
        return self.tokens / max(1, self.num_bins * self.capacity)

    def bin_lengths(self) -> np.ndarray:
        """Tokens in each bin, ``[num_bins]``."""
        if self.num_bins == 0:
            return np.zeros(0, np.int64)
        return np.add.reduceat(self.pieces[self.order, 2], self.offsets[:-1])

    def doc_bins(self) -> list[list[int]]:
        """The bins as document indices (a split document appears once per piece)."""
        docs = self.pieces[:, 0].tolist()
        return [[docs[p] for p in b] for b in self.bins]

    def position_offsets(self) -> np.ndarray:
        """Position id of each piece's first token: 0, or its start if positions continue."""
        return np.zeros(len(self.pieces), np.int64) if self.restart_positions else self.pieces[:, 1].copy()


def split_pieces(lengths, capacity: int) -> np.ndarray:
    """Cut documents into pieces of at most ``capacity``: ``[P, 3]`` rows ``(doc, start, length)``.

    Pieces are ordered by document, then start, so a document's pieces have consecutive ids.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if capacity < 1:
        raise ValueError(f"pack: capacity must be >= 1, got {capacity}")
    if lengths.ndim != 1 or (len(lengths) and lengths.min() < 1):
        bad = int(np.flatnonzero(lengths < 1)[0]) if lengths.ndim == 1 else -1
        raise ValueError(f"pack: lengths must be a 1-D list of ints >= 1 (document {bad} is not)")
    counts = -(-lengths // capacity)  # pieces per document
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts  # piece id of each document's first piece
    k = np.arange(len(doc), dtype=np.int64) - np.repeat(first, counts)  # piece number in its doc
    start = k * capacity
    return np.stack([doc, start, np.minimum(capacity, lengths[doc] - start)], axis=1)


class _OpenBins:
    """Open bins grouped by remaining room: ``room -> [bin ids]`` (FIFO), rooms kept sorted."""

    def __init__(self):
        self.by_room: dict[int, list[int]] = {}
        self.rooms: list[int] = []

    def add(self, room: int, ids) -> None:
        if room <= 0 or len(ids) == 0:
            return
        group = self.by_room.get(room)
        if group is None:
            self.by_room[room] = list(ids)
            bisect.insort(self.rooms, room)
        else:
            group.extend(ids)

    def take(self, room: int, count: int) -> list[int]:
        group = self.by_room[room]
        ids = group[:count]
        del group[:count]
        if not group:
            del self.by_room[room]
            del self.rooms[bisect.bisect_left(self.rooms, room)]
        return ids


def _size_groups(sizes: np.ndarray, priority: np.ndarray, seed: int):
    """Placement order (higher priority first, then longest first, ties in a seeded random order)
    and its runs ``(size, lo, hi)`` of equal size and priority."""
    perm = np.random.default_rng(seed).permutation(len(sizes))
    order = perm[np.lexsort((-sizes[perm], -priority[perm]))]
    s, pr = sizes[order], priority[order]
    if len(s) == 0:
        return order, []
    cuts = np.flatnonzero((np.diff(s) != 0) | (np.diff(pr) != 0)) + 1
    lo = np.concatenate([[0], cuts]).tolist()
    hi = np.concatenate([cuts, [len(s)]]).tolist()
    return order, [(int(s[a]), a, b) for a, b in zip(lo, hi)]


def _new_bins(bin_of, pos, k, size, capacity, first_id):
    """Open ``ceil(k / m)`` bins filled ``m = capacity // size`` at a time; returns their rooms."""
    m = capacity // size
    nb = -(-k // m)
    ids = np.arange(first_id, first_id + nb)
    bin_of[pos:pos + k] = np.repeat(ids, m)[:k]
    last = k - (nb - 1) * m
    return ids, capacity - m * size, capacity - last * size


def _best_fit_decreasing(groups, n, capacity):
    bin_of = np.empty(n, np.int64)
    open_bins, nbins = _OpenBins(), 0
    for s, pos, end in groups:
        k = end - pos
        while k:
            i = bisect.bisect_left(open_bins.rooms, s)
            if i == len(open_bins.rooms):
                break
            room = open_bins.rooms[i]
            q = room // s  # a best-fit bin takes q pieces in a row: its room then drops below s
            t = min(len(open_bins.by_room[room]), -(-k // q))
            ids = open_bins.take(room, t)
            n = min(k, t * q)
            bin_of[pos:pos + n] = np.repeat(ids, q)[:n]
            last = n - (t - 1) * q
            open_bins.add(room - q * s, ids[:-1])
            open_bins.add(room - last * s, ids[-1:])
            pos, k = pos + n, k - n
        if k:
            ids, room_full, room_last = _new_bins(bin_of, pos, k, s, capacity, nbins)
            open_bins.add(room_full, ids[:-1].tolist())
            open_bins.add(room_last, ids[-1:].tolist())
            nbins += len(ids)
    return bin_of, nbins


def _shortest_pack_first(groups, n, capacity):
    bin_of = np.empty(n, np.int64)
    open_bins, nbins = _OpenBins(), 0
    for s, pos, end in groups:
        k = end - pos
        while k and open_bins.rooms and open_bins.rooms[-1] >= s:
            room = open_bins.rooms[-1]  # the shortest pack: most room
            below = open_bins.rooms[-2] if len(open_bins.rooms) > 1 else 0
            c = len(open_bins.by_room[room])
            # rounds this group stays the roomiest (ties go to it) and still fits s
            rounds = min((room - below - 1) // s + 1, room // s)
            full, extra = (rounds, 0) if k >= rounds * c else divmod(k, c)
            ids = open_bins.take(room, c)
            n = full * c + extra
            bin_of[pos:pos + n] = np.concatenate([np.tile(ids, full), ids[:extra]])
            open_bins.add(room - (full + 1) * s, ids[:extra])
            open_bins.add(room - full * s, ids[extra:])
            pos, k = pos + n, k - n
        if k:
            ids, room_full, room_last = _new_bins(bin_of, pos, k, s, capacity, nbins)
            open_bins.add(room_full, ids[:-1].tolist())
            open_bins.add(room_last, ids[-1:].tolist())
            nbins += len(ids)
    return bin_of, nbins


def _first_fit_decreasing(groups, n, capacity):
    bin_of = np.empty(n, np.int64)
    room = np.empty(max(1, n), np.int64)  # room of bin b; at most one bin per piece
    nbins, smallest = 0, min((g[0] for g in groups), default=1)
    dead = 0  # bins [0, dead) have less room than the smallest piece: closed for good
    for s, pos, end in groups:
        k = end - pos
        cand = dead + np.flatnonzero(room[dead:nbins] >= s)
        if len(cand):
            q = room[cand] // s  # a first-fit bin takes q pieces in a row
            cum = np.cumsum(q)
            t = min(len(cand), int(np.searchsorted(cum, k)) + 1)
            n = min(k, int(cum[t - 1]))
            take = np.minimum(q[:t], n - np.concatenate([[0], cum[:t - 1]]))
            bin_of[pos:pos + n] = np.repeat(cand[:t], take)
            room[cand[:t]] -= take * s
            pos, k = pos + n, k - n
        if k:
            ids, room_full, room_last = _new_bins(bin_of, pos, k, s, capacity, nbins)
            room[ids[:-1]], room[ids[-1]] = room_full, room_last
            nbins += len(ids)
        while dead < nbins and room[dead] < smallest:
            dead += 1
    return bin_of, nbins


def _next_fit(sizes, capacity):
    """Next fit in piece order. A full piece closes the open bin and fills one alone, so only
    the shorter pieces need the sequential loop."""
    full = sizes == capacity
    short, full_ids = np.flatnonzero(~full), np.flatnonzero(full)
    full_before = np.cumsum(full)[short]  # full pieces before each short piece
    reset = np.diff(full_before, prepend=0) > 0  # a full piece since the previous short piece
    local = np.empty(len(short), np.int64)
    b, room = -1, 0
    for i, (s, r) in enumerate(zip(sizes[short].tolist(), reset.tolist())):
        if s > room or r:
            b, room = b + 1, capacity
        local[i] = b
        room -= s
    bin_of = np.empty(len(sizes), np.int64)
    bin_of[short] = local + full_before  # a bin's id: bins opened before it, of either kind
    short_before = np.searchsorted(short, full_ids)
    opened = np.where(short_before > 0, local[np.maximum(short_before - 1, 0)] + 1, 0) if len(short) else 0
    bin_of[full_ids] = opened + np.arange(len(full_ids))
    return np.arange(len(sizes)), bin_of, b + 1 + len(full_ids)


def _flat_bins(placed, bin_of, nbins):
    """``(order, counts)``: ``placed`` regrouped bin by bin (``placed[i]`` went into
    ``bin_of[i]``), placement order kept inside a bin, and the pieces per bin."""
    return placed[np.argsort(bin_of, kind="stable")], np.bincount(bin_of, minlength=nbins)


def pack_pieces(lengths, capacity: int, method: str = "bfd", *, restart_positions: bool = True,
                seed: int = 0, priority=None) -> PackResult:
    """Split documents longer than ``capacity`` and pack the pieces into bins (see module doc).

    ``priority`` (one int per document, default all 0): the decreasing methods place the pieces
    of higher-priority documents first, longest first within a priority, so those pieces open
    the first bins and the rest fill around them (the pack builder uses it for carried pieces).
    """
    if method not in METHODS:
        raise ValueError(f"pack: method {method!r} is not one of {', '.join(METHODS)}")
    pieces = split_pieces(lengths, capacity)
    sizes = pieces[:, 2]
    if method == "greedy":
        order, counts = _flat_bins(*_next_fit(sizes, capacity))
    else:
        full = np.flatnonzero(sizes == capacity)  # each fills a bin alone; these bins come first
        rest = np.flatnonzero(sizes < capacity)
        algo = {"bfd": _best_fit_decreasing, "ffd": _first_fit_decreasing, "spfhp": _shortest_pack_first}[method]
        prio = np.zeros(len(pieces), np.int64) if priority is None else np.asarray(priority, np.int64)[pieces[:, 0]]
        placed, groups = _size_groups(sizes[rest], prio[rest], seed)
        bin_of, nbins = algo(groups, len(rest), capacity)
        order, counts = _flat_bins(rest[placed], bin_of, nbins)
        order, counts = np.concatenate([full, order]), np.concatenate([np.ones(len(full), np.int64), counts])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return PackResult(order.astype(np.int64), offsets, pieces, capacity, restart_positions)


def pack(lengths, capacity: int, method: str = "bfd", *, restart_positions: bool = True,
         seed: int = 0) -> list[list[int]]:
    """Bins of document indices, each bin's lengths summing to at most ``capacity``.

    A document longer than ``capacity`` is split first and appears once per piece, its pieces in
    ascending bin order (see the module doc); :func:`pack_pieces` gives the pieces themselves.
    """
    return pack_pieces(lengths, capacity, method, restart_positions=restart_positions, seed=seed).doc_bins()
