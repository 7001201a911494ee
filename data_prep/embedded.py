"""The embedded default corpus: English prose that every CPython installation carries.

It is the reference manual's topics (`pydoc_data.topics`) and the longer docstrings of the standard
library's modules, read with `ast` (nothing is imported). Same Python version, same text; no
download. Tests, the tiny tokenizer and the quick-start run use it.
"""

from __future__ import annotations

import ast
import functools
import os
import sys
import sysconfig
from pathlib import Path

MIN_DOCSTRING_CHARS = 200


@functools.lru_cache(maxsize=1)
def embedded_documents() -> tuple[str, ...]:
    """All documents, in a fixed order: reference topics first, then module docstrings by file name.

    Parsing the standard library takes seconds, so the result is kept in longtune's on-disk cache
    (`longtune.data_prep.cache`), keyed by the Python version and the size and time of every file read."""
    import json

    from .cache import cache_key, cached_text

    files = _source_files()
    key = cache_key([sys.version, str(MIN_DOCSTRING_CHARS), *(_file_identity(path) for path in files)])
    return tuple(json.loads(cached_text("embedded-corpus", key, lambda: json.dumps(_read_documents(files)))))


HELDOUT_EVERY = 10


def is_heldout(text: str) -> bool:
    """Whether a document belongs to the held-out split: about 1 in HELDOUT_EVERY, chosen by a hash of its
    text, so the split does not move when documents are added or reordered."""
    import hashlib

    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


def embedded_split(split: str = "all") -> tuple[str, ...]:
    """The embedded documents of one split: `all`, `train` (without the held-out ones) or `heldout`."""
    docs = embedded_documents()
    if split == "all":
        return docs
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown embedded split {split!r}; valid: all, train, heldout")
    return tuple(doc for doc in docs if is_heldout(doc) == (split == "heldout"))


def _source_files() -> list[Path]:
    import pydoc_data.topics as topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [Path(topics.__file__), *sorted(stdlib.glob("*.py"))]


def _file_identity(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_documents(files: list[Path]) -> list[str]:
    import pydoc_data.topics as topics

    docs = [topics.topics[name] for name in sorted(topics.topics)]
    for path in files[1:]:
        docs.extend(_long_docstrings(path))
    return [doc for doc in docs if doc.strip()]


def _long_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                found.append(doc)
    return found


def corpus_fingerprint() -> str:
    """Short identity of the embedded corpus (it changes with the Python version)."""
    import hashlib

    digest = hashlib.sha256()
    for doc in embedded_documents():
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
    return f"python{os.sys.version_info.major}.{os.sys.version_info.minor}-{digest.hexdigest()[:12]}"
