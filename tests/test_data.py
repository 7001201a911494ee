"""Packing round trips, labels never cross a document boundary, and data order is independent of dp."""

from __future__ import annotations

import random

import datasets
import pytest

from longtune.data_prep.packing import pack_concatenated, unpack_documents
from longtune.train.data import IGNORE_INDEX, StepBatches, collate, row_to_example


def _docs(seed: int, n: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 300))] for _ in range(n)]


@pytest.mark.parametrize("seq_len", [1, 7, 64, 1000])
def test_concatenated_packing_round_trip(seq_len):
    docs = _docs(seq_len)
    rows = list(pack_concatenated(docs, seq_len, drop_last=False))
    assert all(sum(r["doc_lens"]) == len(r["input_ids"]) for r in rows)
    assert all(len(r["input_ids"]) == seq_len for r in rows[:-1])
    pieces = list(unpack_documents(rows))
    # Joining the pieces gives the documents back: every boundary is a document's end or a split.
    assert [t for p in pieces for t in p] == [t for d in docs for t in d]
    rebuilt, current, it = [], [], iter(pieces)
    for doc in docs:
        while len(current) < len(doc):
            current += next(it)
        assert current == doc
        rebuilt.append(current)
        current = []
    assert rebuilt == docs


def test_labels_are_shifted_within_documents_only():
    ids = [10, 11, 12, 20, 21, 30]
    _, labels, positions = row_to_example(ids, [3, 2, 1], document_masking=True)
    assert labels == [11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX]
    assert positions == [0, 1, 2, 0, 1, 0]
    _, labels, positions = row_to_example(ids, [3, 2, 1], document_masking=False)
    assert labels == [11, 12, 20, 21, 30, IGNORE_INDEX]
    assert positions == list(range(6))


def test_collate_pads_with_ignored_labels():
    batch = collate([{"input_ids": [5, 6, 7], "doc_lens": [3]}, {"input_ids": [8], "doc_lens": [1]}],
                    pad_id=0, document_masking=True)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.labels.tolist() == [[6, 7, IGNORE_INDEX], [IGNORE_INDEX] * 3]
    assert batch.counted_tokens == 2 and batch.real_tokens == 4


def test_step_batches_are_the_same_rows_for_every_dp_degree():
    corpus = datasets.Dataset.from_list([{"input_ids": [i, i + 1], "doc_lens": [2]} for i in range(13)])

    def rows(dp: int, step: int) -> list[int]:
        out = []
        for r in range(dp):
            sb = StepBatches(corpus, seed=3, global_batch=4, micro_batch=1, dp=dp, dp_rank=r, pad_id=0,
                             document_masking=True)
            assert sb.grad_accum == 4 // dp
            out += [mb.input_ids[0, 0].item() for mb in sb.for_step(step)]
        return out

    for step in range(8):  # crosses several epochs of 13 rows
        assert rows(1, step) == rows(2, step) == rows(4, step)
    seen = [x for step in range(13) for x in rows(1, step)]
    # Each epoch is a permutation: in 52 rows every one of the 13 rows appears 4 times.
    assert sorted(seen) == sorted(list(range(13)) * 4)
