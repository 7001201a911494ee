"""The metadata file beside the Arrow files (`longtune_corpus.json`): what was asked, what was achieved."""

from __future__ import annotations

from collections import Counter

FORMAT = "longtune-packed-corpus/1"


def build_metadata(config, spec, stats, packed: dict, writer, examples: list[dict], elapsed_s: float) -> dict:
    content = sum(packed["per_source"].values())
    rows = writer.rows
    dropped = Counter()
    for st in stats:
        dropped.update(st.dropped)
    if packed["truncated_docs"]:
        dropped["drop_last"] += packed["truncated_docs"]
    sources = []
    for source, st in zip(config.sources, stats, strict=False):
        achieved = packed["per_source"].get(st.name, 0)
        w = source.weight
        sources.append({
            "name": st.name, "type": st.type,
            "requested": None if w is None else ({"tokens": w.tokens} if w.tokens is not None else {"share": w.share}),
            "budget_tokens": st.budget,
            "achieved_tokens": achieved,
            "achieved_share": achieved / content if content else 0.0,
            "documents_read": st.documents_read,
            "documents_kept": st.documents_kept,
            "stopped_at_budget": st.stopped_at_budget,
            "dropped": dict(sorted(st.dropped.items())),
        })
    return {
        "format": FORMAT,
        "seq_len": config.seq_len,
        "strategy": config.strategy,
        "pad_to_multiple": config.pad_to_multiple,
        "rows": rows,
        "tokens": writer.tokens,
        "content_tokens": content,
        "pad_tokens": packed["pad_tokens"],
        "fill_efficiency": content / (rows * config.seq_len) if rows else 0.0,
        "documents": sum(st.documents_kept for st in stats),
        "documents_split": packed["split_docs"],
        "extra_pieces": packed["extra_pieces"],
        "truncated_tokens": packed["truncated_tokens"],
        "truncated_documents": packed["truncated_docs"],
        "dropped": dict(sorted(dropped.items())),
        "bad_input_examples": examples,
        "sources": sources,
        "tokenizer": {"path": spec.path, "fingerprint": spec.fingerprint,
                      "encoding_fingerprint": spec.encoding_fingerprint, "bos_id": spec.bos_id,
                      "eos_id": spec.eos_id, "pad_id": spec.pad_id},
        "shard": {"index": config.shard.index, "count": config.shard.count},
        "config": config.model_dump(mode="json"),
        "content_hash": writer.content_hash,
        "elapsed_s": round(elapsed_s, 3),
    }
