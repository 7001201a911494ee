"""Out-of-core store of tokenized documents: token ids (and loss masks) appended to flat files on disk,
with a compact in-memory index (offset, length, source, ordinal: 22 bytes per document).

Packing plans refer to documents by index; rows are materialized by reading pieces back with
`pread`, so memory does not grow with the number of tokens.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import numpy as np


class TokenStore:
    def __init__(self, directory: Path, with_mask: bool):
        directory.mkdir(parents=True, exist_ok=True)
        self._ids = open(directory / "ids.int32", "w+b")
        self._mask = open(directory / "mask.uint8", "w+b") if with_mask else None
        self.with_mask = with_mask
        self.offsets = array("q")
        self.lengths = array("i")
        self.source = array("h")
        self.ordinal = array("q")
        self._end = 0          # tokens committed
        self._pending = 0      # tokens of the open document

    # -- writing one document at a time -------------------------------------------------------
    def append(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        if not (isinstance(ids, np.ndarray) and ids.dtype == np.int32 and ids.flags.c_contiguous):
            ids = np.ascontiguousarray(ids, dtype=np.int32)
        self._ids.write(ids)  # the buffer itself, no bytes copy
        if self._mask is not None:
            # A document without its own mask (any text source) is all targets, like a mask-less corpus.
            m = np.ones(len(ids), np.uint8) if mask is None else np.asarray(mask, np.uint8)
            self._mask.write(m.tobytes())
        self._pending += len(ids)

    @property
    def pending_tokens(self) -> int:
        return self._pending

    def commit(self, source: int, ordinal: int) -> int:
        self.offsets.append(self._end)
        self.lengths.append(self._pending)
        self.source.append(source)
        self.ordinal.append(ordinal)
        self._end += self._pending
        self._pending = 0
        return len(self.lengths) - 1

    def abort(self) -> None:
        """Forget the open document (rolled back on disk)."""
        if self._pending:
            self._ids.seek(self._end * 4)
            self._ids.truncate()
            if self._mask is not None:
                self._mask.seek(self._end)
                self._mask.truncate()
        self._pending = 0

    def finish_writing(self) -> None:
        self._ids.flush()
        if self._mask is not None:
            self._mask.flush()

    # -- reading ------------------------------------------------------------------------------
    def read(self, doc: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        pos = self.offsets[doc] + start
        ids = np.frombuffer(os.pread(self._ids.fileno(), 4 * n, 4 * pos), dtype=np.int32)
        mask = None
        if self._mask is not None:
            mask = np.frombuffer(os.pread(self._mask.fileno(), n, pos), dtype=np.uint8)
        return ids, mask

    def __len__(self) -> int:
        return len(self.lengths)

    def close(self) -> None:
        self._ids.close()
        if self._mask is not None:
            self._mask.close()
