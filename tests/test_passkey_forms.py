"""Held-out text and the word-key passkey: the `train` split of the embedded corpus never holds a held-out
document, eval's perplexity text is the held-out split, and word-key samples / prompts / scoring agree."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np

from longtune.data_prep.embedded import embedded_documents, embedded_split, is_heldout
from longtune.data_prep.sources import read_embedded
from longtune.data_prep.synthetic import WORD_KEYS, _landmark_sample, draw_key
from longtune.train.evaluate.common import long_text_documents
from longtune.train.evaluate.passkey import answer_matches
from longtune.train.tokenizer import embedded_tokenizer


def test_embedded_splits_partition_the_corpus():
    docs, train, held = embedded_documents(), embedded_split("train"), embedded_split("heldout")
    assert len(train) + len(held) == len(docs) and not set(train) & set(held)
    assert 0.05 < len(held) / len(docs) < 0.15  # about 1 in 10
    assert sorted(long_text_documents()) == sorted(held)


def test_train_split_reader_leaves_every_heldout_document_out():
    def texts(split):
        return ["".join(d.segments(10 ** 9)) for d in read_embedded(SimpleNamespace(split=split))]
    kept = texts("train")
    assert kept and not any(is_heldout(t) for t in kept)
    assert len(kept) + len(texts("heldout")) == len(texts("all"))


def test_word_keys_are_single_tokens_of_the_embedded_tokenizer():
    tok = embedded_tokenizer()
    assert len(set(WORD_KEYS)) == len(WORD_KEYS) == 64
    for key in WORD_KEYS:
        assert len(tok(f" {key}", add_special_tokens=False)["input_ids"]) == 1, key


def test_word_key_sample_carries_loss_on_the_key_only():
    tok = embedded_tokenizer()
    encode = lambda t: np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int32)  # noqa: E731
    source = SimpleNamespace(key="word", length_tokens=200, min_length_tokens=None)
    ids, mask = _landmark_sample(source, encode, [tok.bos_token_id], [tok.eos_token_id], np.random.default_rng(5))
    answer = tok.decode(ids[mask == 1])
    key = answer.strip(" .")
    assert key in WORD_KEYS and answer == f" {key}."
    prompt = tok.decode(ids[:int(np.argmax(mask))])
    assert prompt.count(f"pass key is {key}.") == 1 and prompt.endswith("The pass key is")  # needle, question


def test_draw_key_forms_and_scoring():
    assert draw_key(random.Random(1), "word") in WORD_KEYS
    assert 1 <= int(draw_key(random.Random(1), "number")) <= 50000
    assert answer_matches(" socket. Remember", "socket", "word")
    assert not answer_matches(" sockets", "socket", "word")
    assert answer_matches(" 12345.", "12345", "number") and not answer_matches(" 1234", "12345", "number")
