"""The default batch builder: documents concatenated in seed order, cut into fixed windows.

Each window is a :class:`~seqshard.data.batches.Row` that keeps its document boundaries, so no
token attends across documents even though windows are full (DESIGN.md invariant 5).
"""
from __future__ import annotations

from .batches import StepBatch, make_row


class WindowBuilder:
    def __init__(self, corpus, max_seq_len: int, tokens_per_step: int, seed: int, continue_positions: bool = False):
        assert tokens_per_step % max_seq_len == 0, (tokens_per_step, max_seq_len)
        self.corpus, self.max_seq_len, self.seed = corpus, max_seq_len, seed
        self.rows_per_step = tokens_per_step // max_seq_len
        self.continue_positions = continue_positions  # a piece's positions start at its offset
        self.epoch, self.cursor, self.offset = 0, 0, 0  # position in the document stream
        self._order = corpus.order(seed, 0)

    def _next_piece(self, room):
        doc = int(self._order[self.cursor])
        length = int(self.corpus.lengths[doc])
        take, start = min(room, length - self.offset), self.offset
        piece = self.corpus.tokens(doc)[start:start + take]
        self.offset += take
        if self.offset == length:
            self.offset, self.cursor = 0, self.cursor + 1
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self.corpus.order(self.seed, self.epoch)
        return piece, doc, start

    def _next_row(self):
        pieces, docs, starts, room = [], [], [], self.max_seq_len
        while room:
            piece, doc, start = self._next_piece(room)
            pieces.append(piece)
            docs.append(doc)
            starts.append(start if self.continue_positions else 0)
            room -= len(piece)
        return make_row(pieces, docs, starts)

    def next_batch(self) -> StepBatch:
        rows = [self._next_row() for _ in range(self.rows_per_step)]
        lens = [n for r in rows for n in r.doc_lens]
        return StepBatch(rows, {"pad_fraction": 0.0, "seq_len_mean": sum(lens) / len(lens),
                                "seq_len_max": max(lens), "attention_flops": 2 * sum(n * n for n in lens)})

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

    def load_state_dict(self, state):
        self.epoch, self.cursor, self.offset = state["epoch"], state["cursor"], state["offset"]
        self._order = self.corpus.order(self.seed, self.epoch)
