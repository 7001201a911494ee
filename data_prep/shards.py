"""Scale-out: the same config runs as N shards (`shard.index=i shard.count=N`, documents whose ordinal
% N == i, budgets split evenly) on N machines; `merge_shards` joins their outputs in shard order."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from .errors import PrepError
from .writer import METADATA_FILE, PackedCorpusWriter


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise PrepError(f"{str(path)!r} is not a finished longtune prep output ({exc})") from None


def merge_shards(output: str, shard_dirs: list[str], overwrite: bool = False):
    from .pipeline import PrepResult

    if not shard_dirs:
        raise PrepError("merge needs at least one shard dir")
    t0 = time.time()
    metas = [_read_meta(Path(d)) for d in shard_dirs]
    first = metas[0]
    for d, m in zip(shard_dirs, metas, strict=False):
        for key in ("seq_len", "strategy", "pad_to_multiple"):
            if m[key] != first[key]:
                raise PrepError(f"shard {d!r} has {key} {m[key]!r}, the first shard has {first[key]!r}")
        if m["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"]:
            raise PrepError(f"shard {d!r} was tokenized with another tokenizer")
    counts = {m["shard"]["count"] for m in metas}
    indices = sorted(m["shard"]["index"] for m in metas)
    if len(counts) != 1 or indices != list(range(counts.pop())):
        raise PrepError(f"shards cover indices {indices}; expected each of 0..count-1 exactly once")
    metas_dirs = sorted(zip(metas, shard_dirs, strict=False), key=lambda md: md[0]["shard"]["index"])
    with_mask = any("loss_mask" in datasets.load_from_disk(d).column_names for _, d in metas_dirs)
    writer = PackedCorpusWriter(Path(output), first["seq_len"], with_mask, overwrite)
    try:
        offset = 0
        for _meta, d in metas_dirs:
            ds = datasets.load_from_disk(d)
            top = 0
            for row in ds:
                idx = [i + offset if i >= 0 else -1 for i in row["doc_index"]]
                top = max([top, *[i + 1 for i in row["doc_index"]]])
                mask = row.get("loss_mask")
                if with_mask and mask is None:
                    mask = np.ones(len(row["input_ids"]), np.int8)
                writer.add_row(np.asarray(row["input_ids"]), row["doc_lens"], row["source"], idx, mask)
            offset += top
        merged = _merge_metadata([m for m, _ in metas_dirs], writer, time.time() - t0)
        writer.close(merged)
        out = writer.publish()
    except BaseException:
        writer.abandon()
        raise
    return PrepResult(out, merged)


def _merge_metadata(metas: list[dict], writer, elapsed: float) -> dict:
    first = metas[0]
    sum_keys = ("content_tokens", "pad_tokens", "documents", "documents_split", "extra_pieces",
                "truncated_tokens", "truncated_documents")
    merged = {k: v for k, v in first.items()}
    for k in sum_keys:
        merged[k] = sum(m[k] for m in metas)
    merged["rows"], merged["tokens"] = writer.rows, writer.tokens
    merged["fill_efficiency"] = merged["content_tokens"] / (writer.rows * first["seq_len"]) if writer.rows else 0.0
    dropped = Counter()
    for m in metas:
        dropped.update(m["dropped"])
    merged["dropped"] = dict(sorted(dropped.items()))
    merged["bad_input_examples"] = [e for m in metas for e in m["bad_input_examples"]][:50]
    sources = []
    for i, s in enumerate(first["sources"]):
        parts = [m["sources"][i] for m in metas]
        d = Counter()
        for p in parts:
            d.update(p["dropped"])
        sources.append({**s, **{k: sum(p[k] or 0 for p in parts) for k in
                                ("achieved_tokens", "documents_read", "documents_kept", "budget_tokens")},
                        "stopped_at_budget": any(p["stopped_at_budget"] for p in parts),
                        "dropped": dict(sorted(d.items()))})
    for s in sources:
        s["achieved_share"] = s["achieved_tokens"] / merged["content_tokens"] if merged["content_tokens"] else 0.0
    merged["sources"] = sources
    merged["shard"] = {"merged_from": [m["content_hash"] for m in metas], "count": len(metas)}
    merged["content_hash"] = writer.content_hash
    merged["elapsed_s"] = round(elapsed, 3)
    return merged
