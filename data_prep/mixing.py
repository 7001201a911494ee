"""Token-budgeted mixing: per-source budgets (absolute or shares), length filters, and Fu et al.'s
per-source length upsampling. Every random choice is a pure function of (seed, source, document
ordinal), so it does not depend on worker or shard counts.
"""

from __future__ import annotations

import hashlib


def uniform_draw(seed: int, source: str, ordinal: int) -> float:
    """A reproducible number in [0, 1) for one document."""
    digest = hashlib.blake2b(f"{seed}\0{source}\0{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def length_verdict(source, content_tokens: int, seed: int, ordinal: int) -> str | None:
    """Why a document of `content_tokens` tokens is left out, or None to keep it."""
    if content_tokens < source.min_tokens:
        return "too_short"
    if source.max_tokens is not None and content_tokens > source.max_tokens:
        return "too_long"
    up = source.upsample
    if up is not None and content_tokens < up.threshold and uniform_draw(seed, source.name, ordinal) >= up.keep_prob:
        return "length_upsampling"
    return None


def shard_part(total: int, index: int, count: int) -> int:
    """This shard's part of a budget; the parts of all shards sum to `total`."""
    return total // count + (1 if index < total % count else 0)


def budget_before_reading(source, total_tokens: int | None, shard_index: int, shard_count: int) -> int | None:
    """A budget known before any document is read (tokens, or share × total_tokens), per shard."""
    w = source.weight
    if w is None:
        return None
    if w.tokens is not None:
        return shard_part(w.tokens, shard_index, shard_count)
    if total_tokens is not None:
        return shard_part(int(w.share * total_tokens), shard_index, shard_count)
    return None


def budgets_from_shares(shares: dict[str, float], available: dict[str, int]) -> dict[str, int]:
    """Shares without a total: the largest corpus whose every share the available tokens can fill."""
    total = min(available[name] / share for name, share in shares.items())
    return {name: int(share * total) for name, share in shares.items()}
