"""Tokenization with a fast HF tokenizer in batched worker processes, in input order.

The work is a stream of tasks (lists of text segments); at most `2 × workers` tasks are in flight,
so memory stays bounded however long the stream. The result does not depend on the worker count:
encoding is a pure function of the text and results are consumed in submission order.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import PrepError


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer and its special ids, resolved once in the main process."""

    json: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    path: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.json.encode()).hexdigest()[:16]

    @property
    def encoding_fingerprint(self) -> str:
        return encoding_fingerprint(self.json)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_str(self.json)


def encoding_fingerprint(tokenizer_json: str) -> str:
    """A hash of what turns text into ids — normalizer, pre-tokenizer, model (vocabulary, merges) and
    added tokens (content → id) — leaving out what a loader may rewrite without changing the ids of a
    text (post-processor, decoder, padding, truncation, added-token flags)."""
    data = json.loads(tokenizer_json)
    part = {key: data.get(key) for key in ("normalizer", "pre_tokenizer", "model")}
    part["added_tokens"] = sorted((t["id"], t["content"]) for t in data.get("added_tokens") or [])
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def _special_from_config(directory: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for key in ("bos_token", "eos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
    return found


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "recipes"
"""Shipped files: `recipes/` of the checkout, or `longtune/recipes` of an installed package."""


def resolve_tokenizer_path(path: str) -> Path:
    """`path` as given when it exists; else a shipped model name (`tiny-base-256` → recipes/models/...)
    or a path inside the checkout's `recipes/` (`recipes/models/tiny-base-256`) found in the package."""
    given = Path(path)
    if given.exists():
        return given
    for candidate in (SHIPPED_DIR / "models" / path, SHIPPED_DIR / Path(path.removeprefix("recipes/"))):
        if path and not given.is_absolute() and candidate.exists():
            return candidate
    return given


def load_tokenizer_spec(path: str, bos_token: str | None = None, eos_token: str | None = None,
                        pad_token: str | None = None) -> TokenizerSpec:
    """A model/tokenizer dir (with tokenizer.json), a tokenizer.json file, or a shipped model's name."""
    p = resolve_tokenizer_path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise PrepError(f"tokenizer {path!r}: no tokenizer.json there (a fast HF tokenizer is required)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust loader raises plain Exception
        raise PrepError(f"tokenizer {path!r}: cannot load {file} ({exc})") from None
    names = _special_from_config(p) if p.is_dir() else {}
    names.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                    ("pad_token", pad_token)) if v is not None})

    def token_id(key: str) -> int | None:
        if key not in names:
            return None
        tid = tok.token_to_id(names[key])
        if tid is None:
            raise PrepError(f"tokenizer {path!r}: {key} {names[key]!r} is not in the vocabulary")
        return tid

    bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    if pad is None:
        pad = eos if eos is not None else 0
    return TokenizerSpec(tok.to_str(), bos, eos, pad, str(path))


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def encode_texts(texts: list[str], tokenizer: Tokenizer | None = None) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), as int32 arrays."""
    tok = tokenizer or _WORKER_TOKENIZER
    return [np.asarray(enc.ids, dtype=np.int32) for enc in tok.encode_batch_fast(texts, add_special_tokens=False)]


def ordered_map(fn: Callable, tasks: Iterable, workers: int, initializer: Callable, initargs: tuple
                ) -> Iterator:
    """`map(fn, tasks)` over `workers` processes, results in task order, ≤ 2 × workers in flight."""
    if workers <= 1:
        initializer(*initargs)
        for task in tasks:
            yield fn(task)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(fn, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _encode_task(task: list[tuple]) -> list[tuple]:
    """A task is a list of events; "seg" events carry text, which becomes token ids here."""
    texts = [ev[1] for ev in task if ev[0] == "seg"]
    ids = iter(encode_texts(texts)) if texts else iter(())
    return [("seg", next(ids)) if ev[0] == "seg" else ev for ev in task]


def encode_events(events: Iterable[tuple], spec: TokenizerSpec, workers: int, batch_chars: int
                  ) -> Iterator[tuple]:
    """Events in, events out, in order: ("seg", text) becomes ("seg", ids); others pass through."""

    def batches() -> Iterator[list[tuple]]:
        task: list[tuple] = []
        chars = 0
        for ev in events:
            task.append(ev)
            if ev[0] == "seg":
                chars += len(ev[1])
            if chars >= batch_chars or len(task) >= 4096:
                yield task
                task, chars = [], 0
        if task:
            yield task

    for done in ordered_map(_encode_task, batches(), workers, _init_worker, (spec.json,)):
        yield from done
