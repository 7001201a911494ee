"""`PackedCorpusWriter`: rows → a `datasets.load_from_disk` directory (docs/data_prep.md, "Output"),
written in small record batches (Arrow list offsets are 32-bit) with a content hash of every row.

Everything is written under `OUT.partial/`; `publish()` renames it to `OUT` only after the metadata
is complete, so a run that dies never leaves an output that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

METADATA_FILE = "longtune_corpus.json"
SHARD_TOKENS = 1 << 28  # ~1 GiB of int32 ids per Arrow file
BATCH_TOKENS = 1 << 20  # rows buffered before an Arrow record batch is written: ~4 MiB of ids (+ its Arrow copy)

TOKENS_COLUMN = "input_ids"
"""A packed row's token ids (int32)."""
DOC_LENS_COLUMN = "doc_lens"
"""The lengths of the documents a row holds, in order (they sum to the row's length)."""
LOSS_MASK_COLUMN = "loss_mask"
"""Optional: per token, 1 where its label counts in the loss and 0 where it does not."""


def corpus_features(with_mask: bool) -> datasets.Features:
    cols = {
        TOKENS_COLUMN: datasets.Sequence(datasets.Value("int32")),
        DOC_LENS_COLUMN: datasets.Sequence(datasets.Value("int32")),
        "source": datasets.Sequence(datasets.Value("string")),
        "doc_index": datasets.Sequence(datasets.Value("int64")),
    }
    if with_mask:
        cols[LOSS_MASK_COLUMN] = datasets.Sequence(datasets.Value("int8"))
    return datasets.Features(cols)


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


class PackedCorpusWriter:
    def __init__(self, output: Path, seq_len: int, with_mask: bool, overwrite: bool = False):
        self.output = Path(output)
        if self.output.exists() and not overwrite:
            from .errors import PrepError

            raise PrepError(f"output {str(self.output)!r} exists (set overwrite: true to replace it)")
        self.dir = partial_dir(self.output)
        if self.dir.exists():
            shutil.rmtree(self.dir)  # what a dead run left behind
        self.dir.mkdir(parents=True)
        self.features = corpus_features(with_mask)
        self.with_mask = with_mask
        self.batch_rows = max(1, min(1000, BATCH_TOKENS // seq_len))
        self._hash = hashlib.sha256()
        self._files: list[str] = []
        self._writer = None
        self._file_tokens = 0
        self._batch: dict[str, list] = {k: [] for k in self.features}
        self.rows = 0
        self.tokens = 0

    @property
    def work_dir(self) -> Path:
        path = self.dir / "_work"
        path.mkdir(exist_ok=True)
        return path

    def add_row(self, input_ids: np.ndarray, doc_lens: list[int], source: list[str], doc_index: list[int],
                loss_mask: np.ndarray | None = None) -> None:
        ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        lens = np.asarray(doc_lens, dtype=np.int32)
        assert int(lens.sum()) == len(ids), (lens.sum(), len(ids))
        h = self._hash
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids)  # the array's buffer, hashed without a copy
        h.update(lens)
        h.update("\0".join(source).encode())
        h.update(np.asarray(doc_index, np.int64).tobytes())
        b = self._batch
        b[TOKENS_COLUMN].append(ids)
        b[DOC_LENS_COLUMN].append(lens)
        b["source"].append(source)
        b["doc_index"].append(list(doc_index))
        if self.with_mask:
            mask = np.ascontiguousarray(loss_mask, dtype=np.int8)
            h.update(mask)
            b[LOSS_MASK_COLUMN].append(mask)
        self.rows += 1
        self.tokens += len(ids)
        self._file_tokens += len(ids)
        if len(b[TOKENS_COLUMN]) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._batch[TOKENS_COLUMN]:
            return
        if self._writer is None:
            from datasets.arrow_writer import ArrowWriter

            name = f"data-{len(self._files):05d}.arrow"
            self._files.append(name)
            self._writer = ArrowWriter(features=self.features, path=str(self.dir / name),
                                       writer_batch_size=self.batch_rows)
        self._writer.write_batch(self._batch)
        self._batch = {k: [] for k in self.features}
        # Arrow's allocator (mimalloc) keeps freed pages of each record batch; hand them back so that
        # peak memory does not creep up with the number of batches written.
        pa.default_memory_pool().release_unused()
        if self._file_tokens >= SHARD_TOKENS:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None
            self._file_tokens = 0

    @property
    def content_hash(self) -> str:
        return self._hash.hexdigest()

    def close(self, metadata: dict) -> None:
        """Finish the Arrow files and write state, features and our metadata (still under .partial)."""
        self._flush()
        if not self._files:  # an empty corpus is still a valid, loadable dataset
            self._writer = None
            self._file_tokens = 0
            from datasets.arrow_writer import ArrowWriter

            self._files.append("data-00000.arrow")
            w = ArrowWriter(features=self.features, path=str(self.dir / self._files[0]))
            w.finalize()
            w.close()
        self._close_file()
        n = len(self._files)
        final = []
        for i, name in enumerate(self._files):
            target = f"data-{i:05d}-of-{n:05d}.arrow"
            os.replace(self.dir / name, self.dir / target)
            final.append({"filename": target})
        state = {"_data_files": final, "_fingerprint": self.content_hash[:16], "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        (self.dir / "state.json").write_text(json.dumps(state, indent=2))
        info = {"citation": "", "description": "longtune packed corpus", "features": self.features.to_dict(),
                "homepage": "", "license": ""}
        (self.dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(self.dir / "_work", ignore_errors=True)
        (self.dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=False))

    def publish(self) -> Path:
        """Atomically replace the output with the finished dir."""
        old = None
        if self.output.exists():
            old = self.output.with_name(self.output.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.output, old)
        os.replace(self.dir, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def abandon(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
