"""Packing tokenized documents into fixed-length rows that keep their document boundaries.

A row is `{"input_ids": [...], "doc_lens": [...]}` with `sum(doc_lens) == len(input_ids)`
(DESIGN.md, "Packed corpus"). A document that does not fit the rest of a row continues in the
next one as a new piece, so every boundary is a real one or a split of one document.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np


def pack_concatenated(docs: Iterable[list[int]], seq_len: int, drop_last: bool = True
                      ) -> Iterator[dict[str, list[int]]]:
    """Concatenate-and-chunk: documents in order, cut into rows of exactly `seq_len` tokens.

    The last, partial row is dropped unless `drop_last` is false.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    ids: list[int] = []
    lens: list[int] = []
    for doc in docs:
        start = 0
        while start < len(doc):
            take = min(seq_len - len(ids), len(doc) - start)
            ids.extend(doc[start:start + take])
            lens.append(take)
            start += take
            if len(ids) == seq_len:
                yield {"input_ids": ids, "doc_lens": lens}
                ids, lens = [], []
    if ids and not drop_last:
        yield {"input_ids": ids, "doc_lens": lens}


def unpack_documents(rows: Iterable[dict[str, list[int]]]) -> Iterator[list[int]]:
    """The pieces of every row, in order (the inverse of packing up to document splits)."""
    for row in rows:
        start = 0
        for n in row["doc_lens"]:
            yield list(row["input_ids"][start:start + n])
            start += n


# --- Packing plans over a document store -------------------------------------------------------
# A plan is an iterator of rows; a row is a list of pieces (doc, start, length) whose lengths sum to
# at most seq_len. Plans only see document lengths, so they work on any corpus size out of core.

Piece = tuple[int, int, int]


def plan_concatenated(lengths, order, seq_len: int, drop_last: bool) -> Iterator[list[Piece]]:
    """Concatenate-and-chunk: documents in `order`, rows of exactly `seq_len` (last one may be short)."""
    row: list[Piece] = []
    used = 0
    for doc in order:
        doc = int(doc)
        length = int(lengths[doc])
        start = 0
        while start < length:
            take = min(seq_len - used, length - start)
            row.append((doc, start, take))
            used += take
            start += take
            if used == seq_len:
                yield row
                row, used = [], 0
    if row and not drop_last:
        yield row


class FreeSpaceIndex:
    """Bins by remaining capacity, with "smallest capacity ≥ n" in O(log seq_len) (a segment tree of
    counts over capacities 0..seq_len)."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)
        self.bins: dict[int, deque[int]] = {}

    def _update(self, cap: int, delta: int) -> None:
        i = cap + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def add(self, cap: int, bin_id: int) -> None:
        self.bins.setdefault(cap, deque()).append(bin_id)
        self._update(cap, 1)

    def take_best_fit(self, need: int) -> tuple[int, int] | None:
        """Remove and return (capacity, bin) of the fullest bin that still fits `need`; ties: oldest bin."""
        cnt, i = self.count, need + self.size
        if cnt[i] == 0:
            while i > 1:
                if i % 2 == 0 and cnt[i + 1] > 0:
                    i += 1
                    break
                i //= 2
            else:
                return None
            while i < self.size:
                i = 2 * i if cnt[2 * i] > 0 else 2 * i + 1
        cap = i - self.size
        bin_id = self.bins[cap].popleft()
        self._update(cap, -1)
        return cap, bin_id


def plan_best_fit(lengths, order, seq_len: int, drop_last: bool = False) -> Iterator[list[Piece]]:
    """Best-fit decreasing over the whole corpus.

    A document longer than `seq_len` is split into full rows of `seq_len` (emitted first, in document
    order) and a remainder; remainders and all other documents are then placed, longest first (ties in
    `order`), into the bin with the least free space that still fits. Only lengths are held in memory.
    `drop_last` is accepted for a uniform signature and has no effect (no row is partial by design).
    """
    order = np.asarray(order, dtype=np.int64)
    lens = np.asarray(lengths, dtype=np.int64)[order]
    items_doc: list[int] = []
    items_start: list[int] = []
    items_len: list[int] = []
    for doc, length in zip(order.tolist(), lens.tolist(), strict=False):
        full = length // seq_len
        for k in range(full):
            yield [(doc, k * seq_len, seq_len)]
        rest = length - full * seq_len
        if rest:
            items_doc.append(doc)
            items_start.append(full * seq_len)
            items_len.append(rest)
    by_size = np.argsort(-np.asarray(items_len, dtype=np.int64), kind="stable")
    bins: list[list[Piece]] = []
    free = FreeSpaceIndex(seq_len)
    for k in by_size.tolist():
        n = items_len[k]
        found = free.take_best_fit(n)
        if found is None:
            bins.append([])
            cap, b = seq_len, len(bins) - 1
        else:
            cap, b = found
        bins[b].append((items_doc[k], items_start[k], n))
        if cap - n > 0:
            free.add(cap - n, b)
    yield from bins


PACKING_STRATEGIES = {
    "concat": plan_concatenated,
    "bfd": plan_best_fit,
}
