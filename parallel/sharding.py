"""Input sharding for sequence parallelism: pure functions from a full batch to one rank's shard.

Layouts split the (padded) sequence over the ring ranks — `contiguous`: rank r holds chunk r of N;
`zigzag`: 2N chunks, rank r holds chunks r and 2N−1−r, which balances causal work — and then split
each ring rank's portion contiguously over the Ulysses ranks. With sequence-chunked layers (`chunks` > 1)
the sequence is first cut into `chunks` consecutive global chunks, each global chunk into `ring` contiguous
blocks (the zigzag layout is not used with chunks), and each block split over the Ulysses ranks: a rank's
i-th local chunk is its part of global chunk i, so Ulysses' all-to-all of local chunk i gathers its ring
block of global chunk i whole, and block r of chunk i is block i·ring + r of a contiguous layout of
chunks·ring blocks. Labels are shifted on the full
sequence before sharding (the caller's collate does it), position ids are global and per document,
and lengths that do not divide are padded with ignored labels as one more document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""The label the loss skips (cross_entropy's default ignore_index): padding, and tokens that predict nothing.
Defined once here, the lowest layer that needs it; train/ imports it."""


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive global positions `[start, start+length)` stored at `offset` locally."""

    start: int
    length: int
    offset: int


def layout_chunks(layout: str, world: int, rank: int, seq_len: int) -> list[Chunk]:
    """The chunks ring rank `rank` of `world` holds for a sequence of `seq_len` (already padded)."""
    if layout == "contiguous" or world == 1:
        size = seq_len // world
        return [Chunk(rank * size, size, 0)]
    if layout == "zigzag":
        size = seq_len // (2 * world)
        return [Chunk(rank * size, size, 0), Chunk((2 * world - 1 - rank) * size, size, size)]
    raise ValueError(f"unknown sequence layout {layout!r}; valid: contiguous, zigzag")


def padding_multiple(layout: str, ring: int, ulysses: int, chunks: int = 1) -> int:
    """Sequence lengths must be a multiple of this for the layout to split evenly."""
    per_ring = 2 * ring if layout == "zigzag" and ring > 1 else ring
    return per_ring * ulysses * chunks


def pad_to_multiple(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                    multiple: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-pad `[B, L]` tensors to a multiple; the padding is an extra document with ignored labels.

    Returns the padded tensors and the number of padding tokens added per row.
    """
    length = input_ids.shape[1]
    padded = math.ceil(length / multiple) * multiple
    extra = padded - length
    if extra == 0:
        return input_ids, labels, position_ids, 0
    b = input_ids.shape[0]
    pad = lambda t, value: torch.cat([t, torch.full((b, extra), value, dtype=t.dtype)], dim=1)  # noqa: E731
    positions = torch.cat([position_ids, torch.arange(extra).expand(b, extra)], dim=1)
    return pad(input_ids, pad_id), pad(labels, IGNORE_INDEX), positions, extra


def shard_sequence(x: torch.Tensor, layout: str, ring: int, ring_rank: int, ulysses: int,
                   ulysses_rank: int, dim: int = 1, chunks: int = 1) -> torch.Tensor:
    """One rank's part of `x` along `dim` (the sequence dimension)."""
    seq_len = x.shape[dim]
    multiple = padding_multiple(layout, ring, ulysses, chunks)
    if seq_len % multiple:
        chunked = f", {chunks} chunks" if chunks > 1 else ""
        raise ValueError(f"sequence length {seq_len} is not divisible by {multiple} ({layout} layout, ring "
                         f"{ring}, ulysses {ulysses}{chunked}); pad it first")
    if chunks > 1:
        if ring > 1 and layout != "contiguous":
            raise ValueError(f"sequence-chunked layers cut a ring into contiguous blocks, not the {layout} layout")
        pieces = [chunk.chunk(ring, dim=dim)[ring_rank].chunk(ulysses, dim=dim)[ulysses_rank]
                  for chunk in x.chunk(chunks, dim=dim)]
        return torch.cat(pieces, dim=dim)
    parts = [x.narrow(dim, c.start, c.length) for c in layout_chunks(layout, ring, ring_rank, seq_len)]
    portion = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
    return portion.chunk(ulysses, dim=dim)[ulysses_rank].contiguous()


def unshard_sequence(shards: list[list[torch.Tensor]], layout: str, dim: int = 1, chunks: int = 1) -> torch.Tensor:
    """Inverse of `shard_sequence`: `shards[ring_rank][ulysses_rank]` → the full tensor."""
    ring = len(shards)
    if chunks > 1:  # global chunk i: every ring rank's i-th local chunk in ring order, each split over Ulysses
        local = [[s.chunk(chunks, dim=dim) for s in row] for row in shards]
        return torch.cat([part[i] for i in range(chunks) for row in local for part in row], dim=dim)
    portions = [torch.cat(row, dim=dim) for row in shards]
    seq_len = sum(p.shape[dim] for p in portions)
    pieces: list[tuple[int, torch.Tensor]] = []
    for rank, portion in enumerate(portions):
        for c in layout_chunks(layout, ring, rank, seq_len):
            pieces.append((c.start, portion.narrow(dim, c.offset, c.length)))
    return torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=dim)


def document_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the `[start, end)` of every document: a new one starts where positions do not increase.

    Positions restart at every document (and at the padding); inside one they only grow, by one, or by
    more where PoSE skips ahead (train/data.py), which is no document boundary."""
    bounds = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] <= row[i - 1]]
        ends = starts[1:] + [len(row)]
        bounds.append(list(zip(starts, ends, strict=True)))
    return bounds
