"""Packing tokenized documents into fixed-length rows that keep their document boundaries.

A row is `{"input_ids": [...], "doc_lens": [...]}` with `sum(doc_lens) == len(input_ids)`
(docs/data_prep.md, "Output"). A document that does not fit the rest of a row continues in the
next one as a new piece, so every boundary is a real one or a split of one document.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
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
    """Bins by remaining capacity, with "smallest capacity ≥ n" by bisection over the sorted distinct
    capacities of the open bins (one FIFO of bins per capacity, so ties go to the oldest bin). Memory and
    time are O(open bins), and every step is a C-level list operation."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.caps: list[int] = []  # sorted, distinct, each with a non-empty queue in `bins`
        self.bins: dict[int, deque[int]] = {}

    def add(self, cap: int, bin_id: int) -> None:
        queue = self.bins.get(cap)
        if queue is None:
            insort(self.caps, cap)
            self.bins[cap] = deque((bin_id,))
        else:
            queue.append(bin_id)

    def take_best_fit(self, need: int) -> tuple[int, int] | None:
        """Remove and return (capacity, bin) of the fullest bin that still fits `need`; ties: oldest bin."""
        caps = self.caps
        i = bisect_left(caps, need)
        if i == len(caps):
            return None
        cap = caps[i]
        queue = self.bins[cap]
        bin_id = queue.popleft()
        if not queue:
            del self.bins[cap]
            del caps[i]
        return cap, bin_id


def plan_best_fit(lengths, order, seq_len: int, drop_last: bool = False) -> Iterator[list[Piece]]:
    """Best-fit decreasing over the whole corpus.

    A document longer than `seq_len` is split into full rows of `seq_len` (emitted first, in document
    order) and a remainder; remainders and all other documents are then placed, longest first (ties in
    `order`), into the bin with the least free space that still fits. Only lengths are held in memory,
    in numpy arrays (a few dozen bytes per document, no Python object per document or piece).
    `drop_last` is accepted for a uniform signature and has no effect (no row is partial by design).
    """
    order = np.asarray(order, dtype=np.int64)
    lens = np.asarray(lengths)[order]  # the store's int32 lengths stay int32: fewer bytes per document
    if lens.dtype.kind != "i":
        lens = lens.astype(np.int64)
    full = lens // seq_len
    for i in np.flatnonzero(full).tolist():
        doc = int(order[i])
        for k in range(int(full[i])):
            yield [(doc, k * seq_len, seq_len)]
    rest = lens - full * seq_len
    del lens
    # items in placement order: longest remainder first, ties in `order`; documents without a remainder
    # (rest 0) sort last and are cut off
    by_size = np.argsort(-rest, kind="stable")[:np.count_nonzero(rest)]
    # 16 bytes per piece (lengths, and so starts, fit in int32)
    p_doc, p_start, p_len = order[by_size], (full[by_size] * seq_len).astype(np.int32), rest[by_size].astype(np.int32)
    del order, full, rest, by_size
    bin_of = array("i")  # the bin of every piece, in placement order
    nbins = 0
    free = FreeSpaceIndex(seq_len)
    take, add, put = free.take_best_fit, free.add, bin_of.append
    for lo in range(0, len(p_len), 1 << 13):
        for n in p_len[lo:lo + (1 << 13)].tolist():
            found = take(n)
            if found is None:
                cap, b = seq_len, nbins
                nbins += 1
            else:
                cap, b = found
            put(b)
            if cap > n:
                add(cap - n, b)
    del free
    # pieces grouped by bin, each bin's pieces in placement order; bins in creation order
    bins = np.frombuffer(bin_of, dtype=np.int32)
    group = np.argsort(bins, kind="stable")
    ends = np.cumsum(np.bincount(bins, minlength=nbins)).tolist()
    del bins, bin_of
    p_doc, p_start, p_len = p_doc[group], p_start[group], p_len[group]
    del group
    lo = 0
    for hi in ends:
        yield list(zip(p_doc[lo:hi].tolist(), p_start[lo:hi].tolist(), p_len[lo:hi].tolist(), strict=True))
        lo = hi


PACKING_STRATEGIES = {
    "concat": plan_concatenated,
    "bfd": plan_best_fit,
}
