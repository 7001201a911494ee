"""Pre-split documents tokenize to the same ids as the whole document: property tests over real files
(the standard library's pydoc topics and a few modules) and adversarial text, for a byte-level BPE (the
embedded tokenizer, GPT-2 style) and a SentencePiece-style Metaspace BPE trained here."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from longtune.data_prep.segments import cut_point, split_stream, split_text

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOPICS = STDLIB / "pydoc_data" / "topics.py"
MODULES = [STDLIB / name for name in ("textwrap.py", "argparse.py", "csv.py", "difflib.py")]


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # as prep reads it: no newline translation


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    from longtune.train.tokenizer import embedded_tokenizer

    return embedded_tokenizer().backend_tokenizer


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """A small SentencePiece-style BPE: Metaspace pre-tokenizer ("▁" for spaces, prepended), trained on
    text with indentation, CRLF, tabs and non-ASCII words, so its merges span those characters."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [read(p) for p in MODULES] + [read(TOPICS)[:200_000], "añb 中文字 \r\n\tx  y  \u00a0z ü" * 50]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"],
                                                        show_progress=False))
    return tok


def ids(tok: Tokenizer, texts: list[str]) -> list[int]:
    return [i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in enc.ids]


def assert_round_trip(tok: Tokenizer, text: str, max_chars: int) -> None:
    segs = list(split_text(text, max_chars))
    assert "".join(segs) == text and max(map(len, segs), default=0) <= max_chars
    assert ids(tok, segs) == ids(tok, [text])


def test_pydoc_topics_round_trips_token_for_token_at_the_default_segment_size(byte_level, metaspace):
    text = read(TOPICS)
    assert len(text) > 700_000
    segs = list(split_text(text, 100_000))  # PrepConfig.max_segment_chars default
    assert len(segs) >= 8
    for tok in (byte_level, metaspace):
        assert ids(tok, segs) == ids(tok, [text])


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
@pytest.mark.parametrize("path", [TOPICS, *MODULES], ids=lambda p: p.name)
def test_stdlib_files_round_trip_with_many_cuts(request, kind, path):
    tok = request.getfixturevalue(kind)
    text = read(path)[:300_000]
    assert_round_trip(tok, text, 1000)  # hundreds of cuts, mostly among indentation


# Adversarial pieces: indentation, CRLF, tabs, long whitespace runs, Unicode spaces and letters,
# punctuation runs, digits, quotes (GPT-2 contractions).
WORDS = st.one_of(
    st.sampled_from(["def", "x", "if", "'s", "'ll", "123456", "3.14", "::=", "**", "naïve", "中文", "ß",
                     "\u00a0", "\u3000", "🙂", "a\u0301", "\x1c", "'", '"', "__init__"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12),
)
SPACES = st.sampled_from([" ", "  ", "    ", "\n", "\r\n", "\n\n", "\t", "\n    ", "\r\n\t ", " \n",
                          " " * 40, "\n" * 30, "\t \t", " \r\n \r\n   "])


@st.composite
def adversarial_text(draw) -> str:
    parts = draw(st.lists(st.tuples(SPACES, WORDS), min_size=40, max_size=400))
    return "".join(space + word for space, word in parts)


def every_cut(text: str, max_chars: int, spaces: str) -> bool:
    """Every cut fell before a character of `spaces` that precedes a non-space character: the promise
    holds only where a window has such a place (not in a "word" of over max_chars/2 characters)."""
    rest = text
    while len(rest) > max_chars:
        cut = cut_point(rest, max_chars)
        if not (rest[cut] in spaces and not rest[cut + 1].isspace()):
            return False
        rest = rest[cut:]
    return True


def exact_for_metaspace(text: str, max_chars: int) -> bool:
    return every_cut(text, max_chars, " ")


def exact_for_byte_level(text: str, max_chars: int) -> bool:
    return every_cut(text, max_chars, " \t\n\r\x0b\x0c")


@settings(max_examples=100, deadline=None)
@given(text=adversarial_text(), max_chars=st.integers(64, 600))
def test_adversarial_text_round_trips_byte_level(byte_level, text, max_chars):
    assume(exact_for_byte_level(text, max_chars))
    assert_round_trip(byte_level, text, max_chars)
    chunks = [text[i:i + 97] for i in range(0, len(text), 97)]  # a file read in pieces: the same cuts
    assert list(split_stream(chunks, max_chars)) == list(split_text(text, max_chars))


@settings(max_examples=100, deadline=None)
@given(text=adversarial_text(), max_chars=st.integers(64, 600))
def test_adversarial_text_round_trips_metaspace(metaspace, text, max_chars):
    assume(exact_for_metaspace(text, max_chars))
    assert_round_trip(metaspace, text, max_chars)


@settings(max_examples=60, deadline=None)
@given(words=st.lists(WORDS, min_size=50, max_size=300), max_chars=st.integers(64, 400))
def test_text_without_line_breaks_round_trips_for_both(byte_level, metaspace, words, max_chars):
    text = " ".join(words)
    assume(exact_for_metaspace(text, max_chars))  # implies exact_for_byte_level
    for tok in (byte_level, metaspace):
        assert_round_trip(tok, text, max_chars)


def test_line_breaks_without_spaces_round_trip_byte_level(byte_level):
    text = "\r\n".join("中文字" * (i % 7 + 1) + "\t" * (i % 3) for i in range(3000))
    assert " " not in text
    assert_round_trip(byte_level, text, 500)


def test_cut_prefers_a_space_before_a_word():
    text = "a" * 60 + "\n" + "b" * 10 + " c" + "\t\t" + "d" * 200
    assert cut_point(text, 100) == 71  # before " c", not before the later tab (exact for byte-level only)
    assert cut_point(text.replace(" c", "cc"), 100) == 74  # no such space: before the last tab
    assert cut_point("x" * 300, 100) == 100  # one giant word: anywhere
