"""The embedded default corpus: English prose that every CPython installation carries.

It is the reference manual's topics (`pydoc_data.topics`) and the longer docstrings of the standard
library's modules, read with `ast` (nothing is imported). Same Python version, same text; no
download. Tests, the tiny tokenizer and the quick-start run use it.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from pathlib import Path

MIN_DOCSTRING_CHARS = 200


@functools.lru_cache(maxsize=1)
def embedded_documents() -> tuple[str, ...]:
    """All documents, in a fixed order: reference topics first, then module docstrings by file name."""
    import pydoc_data.topics as topics

    docs = [topics.topics[name] for name in sorted(topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        docs.extend(_long_docstrings(path))
    return tuple(doc for doc in docs if doc.strip())


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
