"""Packing tokenized documents into fixed-length rows that keep their document boundaries.

A row is `{"input_ids": [...], "doc_lens": [...]}` with `sum(doc_lens) == len(input_ids)`
(DESIGN.md, "Packed corpus"). A document that does not fit the rest of a row continues in the
next one as a new piece, so every boundary is a real one or a split of one document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


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
