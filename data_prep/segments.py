"""Pre-splitting of huge documents into bounded text segments, so that tokenizers neither hang
(quadratic merges on one giant "word", transformers #25873) nor hold a 100M-character document at once.

Segments are tokenized separately and their ids concatenated, so a cut must fall where the tokenizer's
pre-tokenizer starts a new word in the whole document too, with the same words on both sides:

1. before a space that is followed by a non-space character. Metaspace (SentencePiece-style)
   pre-tokenizers start a word at every space and do not prepend another "▁" to a segment that already
   starts with one; the GPT-2 byte-level regex ends a whitespace run one character before a non-space
   character (`\\s+(?!\\S)`) and glues that last space to the following word (` ?\\p{L}+`). Exact for both.
2. failing that, before the last whitespace character of a run that precedes a non-space character
   (e.g. the "\\n" of "x\\r\\ny"): the byte-level regex splits there too, so this is exact for byte-level BPE
   (not for Metaspace, which keeps tabs and line breaks inside words).
3. failing that (a "word" of over max_chars/2 characters, which no tokenizer splits anyway), at max_chars.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# ASCII whitespace, which Python and the tokenizers' regexes (Unicode White_Space) agree on, before a
# non-space character: Python's `\S` (not `str.isspace()`) is non-space for both, as `isspace()` holds
# for a superset of White_Space.
_LAST_SPACE = re.compile(r"[\t\n\r\x0b\x0c ](?=\S)")


def _before_space_word(text: str, low: int, high: int) -> int:
    """The last i in (low, high) with text[i] == " " and text[i+1] not whitespace; -1 if none."""
    pos = high
    while (i := text.rfind(" ", low + 1, pos)) >= 0:
        if not text[i + 1].isspace():
            return i
        pos = i
    return -1


def _before_last_space(text: str, low: int, high: int) -> int:
    """The last i in (low, high) with text[i] ASCII whitespace and text[i+1] not whitespace; -1 if none."""
    last = -1
    for m in _LAST_SPACE.finditer(text, low + 1, high + 1):
        last = m.start()
    return last


def cut_point(text: str, max_chars: int) -> int:
    """Where to end the first segment of `text` (len(text) > max_chars): a position in (max/2, max]."""
    low = max_chars // 2
    high = min(max_chars, len(text) - 1)  # text[i + 1] exists for every candidate i < high
    for rule in (_before_space_word, _before_last_space):
        cut = rule(text, low, high)
        if cut > low:
            return cut
    return max_chars


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Segments of at most `max_chars` characters that join back to `text` (the rest of a huge text is
    never copied: a cut only looks at the next max_chars + 1 characters)."""
    start = 0
    while len(text) - start > max_chars:
        cut = cut_point(text[start:start + max_chars + 1], max_chars)
        yield text[start:start + cut]
        start += cut
    if start < len(text):
        yield text[start:]


def split_stream(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    """`split_text` over a text that arrives in chunks (a file read piece by piece)."""
    carry = ""
    for chunk in chunks:
        carry += chunk
        while len(carry) > max_chars:
            cut = cut_point(carry, max_chars)
            yield carry[:cut]
            carry = carry[cut:]
    if carry:
        yield carry
