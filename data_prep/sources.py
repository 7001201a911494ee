"""Source readers, one per `type`, in a registry. A reader yields, in a fixed order, one item per
input document: a `RawDocument` (whose text arrives as bounded segments) or a `BadInput` that says
why a document could not be read. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import PrepError
from .segments import split_stream, split_text

READ_CHARS = 1 << 20
_BLANK = re.compile(r"[ \t\n\r\x0b\x0c]*")  # what bytes.strip() strips: no copy of a huge line to test it


class BadDocument(Exception):
    """Raised by a segment iterator when a document turns out to be unreadable part-way."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RawDocument:
    where: str
    segments: Callable[[int], Iterator[str]]
    """segments(max_chars) → the document's text in pieces of at most max_chars characters."""


@dataclass
class BadInput:
    where: str
    reason: str
    detail: str = ""


def _text_segments(text: str) -> Callable[[int], Iterator[str]]:
    return lambda max_chars: split_text(text, max_chars)


def _suffix(name: str) -> str:
    """`PurePath(name).suffix`, on a plain name."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _walk(directory: str, suffixes: list[str] | None) -> Iterator[str]:
    """The files under `directory`, recursively, in the order of `sorted(Path(directory).rglob("*"))`
    (by path parts), generated lazily: only the listings of the directories on the current path are held."""
    try:
        names = sorted(os.listdir(directory))
    except PermissionError:  # like rglob: an unreadable directory contributes nothing
        return
    for name in names:
        path = f"{directory}/{name}" if directory != "/" else f"/{name}"
        try:
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                mode = os.stat(path).st_mode
                if stat.S_ISDIR(mode):  # rglob does not follow symlinked directories
                    continue
        except OSError:  # vanished, dangling link, ...: not a file (Path.is_file() says False)
            continue
        if stat.S_ISDIR(mode):
            yield from _walk(path, suffixes)
        elif stat.S_ISREG(mode) and (suffixes is None or _suffix(name) in suffixes):
            yield path


def expand_paths(patterns: list[str], suffixes: list[str] | None = None) -> Iterator[Path]:
    """Files named by paths, directories (recursively, filtered by suffix) and globs, sorted, once each.
    A pattern that matches nothing is a config error (raised here, before any file is yielded).

    The files are generated, not listed: memory does not grow with the number of files. Only when a file
    can be named twice (several patterns, or a glob) are the names seen so far kept, to skip repeats."""
    return map(Path, expand_path_names(patterns, suffixes))


def expand_path_names(patterns: list[str], suffixes: list[str] | None = None) -> Iterator[str]:
    """`expand_paths` as the strings `str(path)` (no Path object per file)."""
    for pattern in patterns:
        exists = next(glob.iglob(pattern, recursive=True), None) is not None if glob.has_magic(pattern) else (
            Path(pattern).exists())
        if not exists:
            raise PrepError(f"source path {pattern!r} matches no file")
    return _expand(patterns, suffixes)


def _expand(patterns: list[str], suffixes: list[str] | None) -> Iterator[str]:
    seen: set[str] | None = set() if len(patterns) > 1 or any(map(glob.has_magic, patterns)) else None
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        for match in matches:
            path = Path(match)
            for found in _walk(str(path), suffixes) if path.is_dir() else (str(path),):
                if seen is not None:
                    if found in seen:
                        continue
                    seen.add(found)
                yield found


def _file_chunks(path: str) -> Iterator[str]:
    try:
        with open(path, "rb") as raw:
            if os.fstat(raw.fileno()).st_size <= READ_CHARS:
                # a small file (the usual case) in one read and one decode; the same text as below,
                # since newline="" translates nothing
                # (segments do not depend on where chunks end, so a file that grew since fstat is fine too)
                text = raw.read().decode("utf-8", errors="strict")
                if text:
                    yield text
                return
        with open(path, encoding="utf-8", errors="strict", newline="") as fh:
            while chunk := fh.read(READ_CHARS):
                yield chunk
    except UnicodeDecodeError as exc:
        raise BadDocument("non_utf8", f"{exc.reason} at byte {exc.start} of a chunk") from None
    except OSError as exc:
        raise BadDocument("unreadable", exc.strerror or str(exc)) from None


def read_text(source) -> Iterator[RawDocument | BadInput]:
    for path in expand_path_names(source.paths, source.suffixes):
        yield RawDocument(path, lambda max_chars, p=path: split_stream(_file_chunks(p), max_chars))


def _field_text(record, field: str, where: str) -> RawDocument | BadInput:
    if not isinstance(record, dict) or field not in record or record[field] is None:
        return BadInput(where, "missing_field", f"no text field {field!r}")
    text = record[field]
    if not isinstance(text, str):
        return BadInput(where, "not_text", f"field {field!r} is {type(text).__name__}, not a string")
    return RawDocument(where, _text_segments(text))


def read_jsonl(source) -> Iterator[RawDocument | BadInput]:
    for path in expand_paths(source.paths, [".jsonl", ".json"]):
        try:
            fh = open(path, "rb")
        except OSError as exc:
            yield BadInput(str(path), "unreadable", exc.strerror or str(exc))
            continue
        with fh:
            for number, line in enumerate(_utf8_lines(fh), start=1):
                where = f"{path}:{number}"
                if isinstance(line, BadInput):
                    yield BadInput(where, line.reason, line.detail)
                    continue
                if _BLANK.fullmatch(line):
                    continue  # a blank line is not a document
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield BadInput(where, "malformed_json", exc.msg)
                    continue
                finally:
                    del line  # while the document is consumed, only its text is held
                yield _field_text(record, source.text_field, where)
                del record


def _utf8_lines(fh) -> Iterator[str | BadInput]:
    """The lines of a binary file, decoded; the bytes of a line are let go before it is handed on."""
    for raw in fh:
        try:
            line: str | BadInput = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = BadInput("", "non_utf8", exc.reason)
        del raw
        yield line


def read_parquet(source) -> Iterator[RawDocument | BadInput]:
    import pyarrow.parquet as pq

    for path in expand_paths(source.paths, [".parquet"]):
        try:
            pf = pq.ParquetFile(path)
            if source.text_field not in pf.schema_arrow.names:
                yield BadInput(str(path), "missing_field", f"no column {source.text_field!r} "
                               f"(columns: {', '.join(pf.schema_arrow.names)}); {pf.metadata.num_rows} rows")
                continue
            row = 0
            for batch in pf.iter_batches(columns=[source.text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    row += 1
                    yield _field_text({source.text_field: text}, source.text_field, f"{path}#{row}")
        except (OSError, ValueError) as exc:
            yield BadInput(str(path), "unreadable", str(exc))


def read_csv(source) -> Iterator[RawDocument | BadInput]:
    csv.field_size_limit(sys.maxsize)
    for path in expand_paths(source.paths, [".csv", ".tsv"]):
        try:
            with open(path, encoding="utf-8", errors="strict", newline="") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ",")
                if source.text_field not in (reader.fieldnames or []):
                    yield BadInput(str(path), "missing_field", f"no column {source.text_field!r} "
                                   f"(columns: {', '.join(reader.fieldnames or [])})")
                    continue
                for number, record in enumerate(reader, start=2):
                    yield _field_text(record, source.text_field, f"{path}:{number}")
        except UnicodeDecodeError as exc:
            yield BadInput(str(path), "non_utf8", f"{exc.reason}; the rest of the file is not read")
        except (OSError, csv.Error) as exc:
            yield BadInput(str(path), "unreadable", str(exc))


def read_hf(source) -> Iterator[RawDocument | BadInput]:
    import datasets

    try:
        ds = datasets.load_from_disk(source.path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise PrepError(f"source {source.name!r}: {source.path!r} is not a saved dataset ({exc})") from None
    if source.text_field not in ds.column_names:
        yield BadInput(source.path, "missing_field", f"no column {source.text_field!r} "
                       f"(columns: {', '.join(ds.column_names)}); {len(ds)} rows")
        return
    row = 0
    for batch in ds.select_columns([source.text_field]).iter(batch_size=1024):
        for text in batch[source.text_field]:
            yield _field_text({source.text_field: text}, source.text_field, f"{source.path}#{row}")
            row += 1


def read_embedded(source) -> Iterator[RawDocument | BadInput]:
    from .embedded import embedded_documents, is_heldout

    split = getattr(source, "split", "all")
    for i, text in enumerate(embedded_documents()):
        if split == "all" or is_heldout(text) == (split == "heldout"):
            yield RawDocument(f"embedded#{i}", _text_segments(text))


READERS: dict[str, Callable[..., Iterator[RawDocument | BadInput]]] = {
    "text": read_text,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "csv": read_csv,
    "hf": read_hf,
    "embedded": read_embedded,
}


def read_source(source) -> Iterator[RawDocument | BadInput]:
    return READERS[source.type](source)


def haystack_texts(source) -> Iterator[str]:
    """Whole texts of a text-bearing source (for synthetic haystacks); bad inputs are skipped here
    because the source itself reports them."""
    for item in read_source(source):
        if isinstance(item, RawDocument):
            try:
                yield "".join(item.segments(1 << 30))
            except BadDocument:
                continue
