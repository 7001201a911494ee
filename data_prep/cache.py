"""A small on-disk cache for text that is slow to derive but fully determined by its inputs: the embedded
corpus (about a second of parsing the standard library per process) and the embedded tokenizer trained on it.

Entries are plain text (JSON), never pickles, named by a SHA-256 of everything they are derived from, so
a changed input is a new name, never a stale hit. Writes go to a temporary file renamed into place, so
processes starting together (the ranks of one run) never read a half-written entry. Where the cache
cannot be read or written the value is simply derived again.

Location: `$LONGTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/longtune`, else `~/.cache/longtune`.
`LONGTUNE_CACHE_DIR=""` (set but empty) turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .atomic_write import atomic_write

CACHE_ENV = "LONGTUNE_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where entries live; None when the user turned the cache off."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]) if os.environ[CACHE_ENV] else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "longtune"


def cache_key(parts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def cached_text(name: str, key: str, build: Callable[[], str]) -> str:
    """The entry `name`-`key`, built with `build()` and stored when missing or unreadable."""
    root = cache_dir()
    path = root / f"{name}-{key}.json" if root is not None else None
    if path is not None:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            pass
    text = build()
    if path is not None:
        with contextlib.suppress(OSError):  # best effort: an entry that cannot be written is derived again
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as handle:
                handle.write(text)
    return text

