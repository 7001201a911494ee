"""Pre-splitting of huge documents into bounded text segments, so that tokenizers neither hang
(quadratic merges on one giant "word", transformers #25873) nor hold a 100M-character document at once.

A cut is made just after a single line break between two non-space characters, where byte-level
and Metaspace pre-tokenizers start a new word anyway; failing that, before a space; failing that,
anywhere. Segments are tokenized separately and their ids concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def cut_point(text: str, max_chars: int) -> int:
    """Where to end the first segment of `text` (len(text) > max_chars): a position in (max/2, max]."""
    low = max_chars // 2
    pos = max_chars
    while True:
        nl = text.rfind("\n", low, pos)
        if nl < 0:
            break
        # a lone line break between two non-space characters: "\n\n" would merge into one token
        if nl + 1 < len(text) and not text[nl + 1].isspace() and nl > 0 and not text[nl - 1].isspace():
            return nl + 1
        pos = nl
    sp = text.rfind(" ", low + 1, max_chars)
    if sp > low:
        return sp
    return max_chars


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Segments of at most `max_chars` characters that join back to `text`."""
    yield from split_stream((text,), max_chars)


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
