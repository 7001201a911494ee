"""`prepare_corpus(config)`: read sources → tokenize → select by budget → pack → write, in that order.

Phases: (1) every source is read in a fixed order and its kept documents are tokenized into an
out-of-core `TokenStore`; (2) share budgets are resolved and over-budget documents are counted out;
(3) a packing strategy turns document lengths into rows; (4) rows are read back from the store and
written by `PackedCorpusWriter`; metadata and the report go beside them; the dir is published.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import PrepConfig, SyntheticSource
from .errors import PrepError
from .mixing import budget_before_reading, budgets_from_shares, length_verdict
from .packing import PACKING_STRATEGIES
from .sources import BadDocument, BadInput, haystack_texts, read_source
from .store import TokenStore
from .synthetic import haystack_pool, synthetic_samples
from .tokenization import TokenizerSpec, encode_events, load_tokenizer_spec
from .writer import PackedCorpusWriter

log = logging.getLogger(__name__)

PAD_SOURCE = "<pad>"
MAX_EXAMPLES = 50
BAD_INPUT_REASONS = {"malformed_json", "non_utf8", "empty", "missing_field", "not_text", "unreadable"}


@dataclass
class SourceStats:
    name: str
    type: str
    documents_read: int = 0
    documents_kept: int = 0
    tokens_kept: int = 0
    budget: int | None = None
    stopped_at_budget: bool = False
    dropped: Counter = field(default_factory=Counter)
    lengths: array = field(default_factory=lambda: array("i"))  # kept documents (report only): 4 bytes each


@dataclass
class PrepResult:
    output: Path
    metadata: dict


class _Progress:
    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", desc="prep", dynamic_ncols=True, mininterval=0.5)

    def update(self, tokens: int, name: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{name}, {self.tokens_add(tokens):,} tokens", refresh=False)

    _tokens = 0

    def tokens_add(self, n: int) -> int:
        self._tokens += n
        return self._tokens

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Ingest:
    """Phase 1: documents of all sources into the store, with every drop counted by reason."""

    def __init__(self, config: PrepConfig, spec: TokenizerSpec, store: TokenStore, progress: _Progress):
        self.config, self.spec, self.store, self.progress = config, spec, store, progress
        self.bos = [spec.bos_id] if config.add_bos and spec.bos_id is not None else []
        self.eos = [spec.eos_id] if config.add_eos and spec.eos_id is not None else []
        self._bos_ids = np.asarray(self.bos, np.int32)
        self._eos_ids = np.asarray(self.eos, np.int32)
        self.examples: list[dict] = []
        self._tokenizer = spec.tokenizer()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def drop(self, stats: SourceStats, reason: str, where: str, detail: str = "") -> None:
        if self.config.strict and reason in BAD_INPUT_REASONS:
            raise PrepError(f"source {stats.name!r}: {where}: {reason}" + (f" ({detail})" if detail else "")
                            + " [strict mode]")
        stats.dropped[reason] += 1
        if reason in BAD_INPUT_REASONS and len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"source": stats.name, "where": where, "reason": reason, "detail": detail})

    def keep(self, stats: SourceStats, sid: int, ordinal: int) -> bool:
        """Commit the open document; True when the source's budget is now reached."""
        n = self.store.pending_tokens
        self.store.commit(sid, ordinal)
        stats.documents_kept += 1
        stats.tokens_kept += n
        stats.lengths.append(n)
        self.progress.update(n, stats.name)
        return stats.budget is not None and stats.tokens_kept >= stats.budget

    def _mine(self, ordinal: int) -> bool:
        return ordinal % self.config.shard.count == self.config.shard.index

    def run_text_source(self, sid: int, source, stats: SourceStats) -> None:
        cfg = self.config

        def events():
            for ordinal, item in enumerate(read_source(source)):
                if not self._mine(ordinal):
                    continue
                if isinstance(item, BadInput):
                    yield ("bad", ordinal, item.where, item.reason, item.detail)
                    continue
                nonblank = False
                try:
                    for seg in item.segments(cfg.max_segment_chars):
                        nonblank = nonblank or not seg.isspace()
                        yield ("seg", seg)
                except BadDocument as exc:
                    yield ("bad", ordinal, item.where, exc.reason, exc.detail)
                    continue
                yield ("end", ordinal, item.where, nonblank)

        store, open_doc = self.store, False
        n_bos, n_eos = len(self.bos), len(self.eos)
        stream = encode_events(events(), self.spec, cfg.workers, cfg.batch_chars)
        try:
            for ev in stream:
                kind = ev[0]
                if kind == "seg":
                    if not open_doc:
                        if n_bos:
                            store.append(self._bos_ids)
                        open_doc = True
                    store.append(ev[1])
                    continue
                stats.documents_read += 1
                content = store.pending_tokens - (n_bos if open_doc else 0)
                open_doc = False
                if kind == "bad":
                    store.abort()
                    self.drop(stats, ev[3], ev[2], ev[4])
                    continue
                _, ordinal, where, nonblank = ev
                reason = "empty" if not nonblank else length_verdict(source, content, cfg.seed, ordinal)
                if reason is not None:
                    store.abort()
                    self.drop(stats, reason, where)
                    continue
                if n_eos:
                    store.append(self._eos_ids)
                if self.keep(stats, sid, ordinal):
                    stats.stopped_at_budget = True
                    break
        finally:
            stream.close()
            store.abort()

    def run_synthetic_source(self, sid: int, source: SyntheticSource, stats: SourceStats) -> None:
        cfg = self.config
        if source.haystack == "embedded":
            from .embedded import embedded_documents

            texts = iter(embedded_documents())
        else:
            texts = haystack_texts(next(s for s in cfg.sources if s.name == source.haystack))
        pool = haystack_pool(texts, self.encode, max(4 * source.length_tokens, 1 << 16))
        mine = (k for k in range(source.samples) if self._mine(k))
        for ordinal, ids, mask in synthetic_samples(source, pool, self.encode, self.bos, self.eos, mine):
            stats.documents_read += 1
            self.store.append(ids, mask)
            if self.keep(stats, sid, ordinal):
                stats.stopped_at_budget = True
                break


def _select(config: PrepConfig, store: TokenStore, stats: list[SourceStats]) -> np.ndarray:
    """Phase 2: documents within every source's budget, in store order."""
    shares = {s.name: s.weight.share for s in config.sources
              if s.weight is not None and s.weight.share is not None and config.total_tokens is None}
    if shares:
        available = {st.name: st.tokens_kept for st in stats}
        empty = [n for n in shares if available[n] == 0]
        if empty:
            raise PrepError(f"source(s) {', '.join(empty)} have a token share but no kept document")
        for name, budget in budgets_from_shares(shares, available).items():
            next(st for st in stats if st.name == name).budget = budget
    lengths = np.frombuffer(store.lengths, dtype=np.int32)
    sources = np.frombuffer(store.source, dtype=np.int16)
    keep = np.ones(len(lengths), dtype=bool)
    for sid, st in enumerate(stats):
        if st.budget is None:
            continue
        idx = np.flatnonzero(sources == sid)
        cum = np.cumsum(lengths[idx].astype(np.int64))
        # keep documents until the budget is reached (the one that crosses it included)
        over = idx[np.concatenate([[False], cum[:-1] >= st.budget])] if len(idx) else idx
        keep[over] = False
        st.dropped["over_budget"] += len(over)
        st.documents_kept -= len(over)
        st.tokens_kept -= int(lengths[over].sum())
        st.lengths = lengths[idx[~np.isin(idx, over)]]
    return np.flatnonzero(keep)


def _nothing_kept(stats: list[SourceStats]) -> str:
    """The error for a run that kept no document: what each source read and why it dropped it."""
    parts = []
    for st in stats:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(st.dropped.items())) or "nothing dropped"
        parts.append(f"{st.name!r}: {st.documents_read} read ({why})")
    return ("every document was dropped, the corpus would have 0 rows — " + "; ".join(parts)
            + " (set allow_empty: true to write it anyway)")


def _write_rows(config: PrepConfig, spec: TokenizerSpec, store: TokenStore, order: np.ndarray,
                writer: PackedCorpusWriter, names: list[str]) -> dict:
    """Phases 3-4: plan rows with the configured strategy and write them."""
    lengths = np.frombuffer(store.lengths, dtype=np.int32)
    src = np.frombuffer(store.source, dtype=np.int16)
    plan = PACKING_STRATEGIES[config.strategy](lengths, order, config.seq_len, config.drop_last)
    m = config.pad_to_multiple
    written = np.zeros(len(lengths), dtype=np.int64)
    per_source = Counter()
    pad_tokens = 0
    row_fill: list[int] = []
    split_docs = extra_pieces = 0
    with_mask = writer.with_mask
    for row in plan:
        ids, masks, doc_lens, sources, doc_index = [], [], [], [], []
        for doc, start, n in row:
            piece, mask = store.read(doc, start, n)
            ids.append(piece)
            if with_mask:
                masks.append(mask if mask is not None else np.ones(n, np.uint8))
            name = names[src[doc]]
            doc_lens.append(n)
            sources.append(name)
            doc_index.append(doc)
            written[doc] += n
            per_source[name] += n
            if start > 0:
                extra_pieces += 1
            elif n < lengths[doc]:
                split_docs += 1
        content = sum(doc_lens)
        row_fill.append(content)
        pad = (-content) % m
        if pad:
            ids.append(np.full(pad, spec.pad_id, np.int32))
            if with_mask:
                masks.append(np.zeros(pad, np.uint8))
            doc_lens.append(pad)
            sources.append(PAD_SOURCE)
            doc_index.append(-1)
            pad_tokens += pad
        writer.add_row(np.concatenate(ids), doc_lens, sources, doc_index,
                       np.concatenate(masks) if with_mask else None)
    selected = lengths[order].astype(np.int64)
    truncated_docs = int(np.count_nonzero(written[order] < selected))
    return {"per_source": per_source, "pad_tokens": pad_tokens, "row_fill": row_fill,
            "split_docs": split_docs, "extra_pieces": extra_pieces,
            "truncated_tokens": int(selected.sum() - written[order].sum()), "truncated_docs": truncated_docs}


def prepare_corpus(config: PrepConfig) -> PrepResult:
    """Build the packed corpus described by `config`; returns the published dir and its metadata."""
    t0 = time.time()
    spec = load_tokenizer_spec(config.tokenizer, config.bos_token, config.eos_token, config.pad_token)
    output = Path(config.output)
    writer = PackedCorpusWriter(output, config.seq_len, config.wants_loss_mask(), config.overwrite)
    progress = _Progress(config.progress)
    store = None
    try:
        store = TokenStore(writer.work_dir, config.wants_loss_mask())
        ingest = _Ingest(config, spec, store, progress)
        stats = []
        for sid, source in enumerate(config.sources):
            st = SourceStats(source.name, source.type)
            st.budget = budget_before_reading(source, config.total_tokens, config.shard.index, config.shard.count)
            stats.append(st)
            if isinstance(source, SyntheticSource):
                ingest.run_synthetic_source(sid, source, st)
            else:
                ingest.run_text_source(sid, source, st)
        store.finish_writing()
        progress.close()
        selected = _select(config, store, stats)
        if not len(selected) and not config.allow_empty:
            raise PrepError(_nothing_kept(stats))
        order = selected
        if config.strategy == "concat" and config.shuffle:
            order = np.random.default_rng(config.seed).permutation(selected)
        names = [s.name for s in config.sources]
        packed = _write_rows(config, spec, store, order, writer, names)
        from .metadata import build_metadata

        metadata = build_metadata(config, spec, stats, packed, writer, ingest.examples, time.time() - t0)
        store.close()
        store = None
        writer.close(metadata)
        if config.plots:
            from .report import write_plots

            write_plots(writer.dir, stats, metadata, packed["row_fill"], config.seq_len)
        out = writer.publish()
    except BaseException:
        progress.close()
        if store is not None:
            store.close()
        writer.abandon()
        raise
    return PrepResult(out, metadata)
