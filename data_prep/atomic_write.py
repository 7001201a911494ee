"""`atomic_write`: replace one file so that a reader (or a crash) sees the old content or the new, never a part.

It lives in data_prep/, the bottom layer (no imports of train/ or parallel/), so both data_prep/ and train/
use it. Directories are published differently (a `.partial` sibling renamed in place): see their writers.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path` (same directory, so the rename stays on one filesystem) for
    writing; when the block ends without an exception it is flushed, fsynced and renamed over `path`
    (`os.replace`), else removed. `mode`: "w" (text) or "wb" (bytes)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode {mode!r}: expected 'w' or 'wb'")
    path = Path(path)
    # A unique name created with "x": concurrent writers never share a temp file, and the file gets the
    # permissions `open` gives under the umask (mkstemp would give 0600).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
