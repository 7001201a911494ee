"""One rank's micro-batch under sequence parallelism: pad, shard, and describe the shard."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dims import ParallelDims
from .sharding import document_bounds, pad_to_multiple, padding_multiple, shard_sequence
from .sp_attention import SequenceParallelContext


@dataclass
class ShardedBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    real_tokens: int  # tokens of this shard that are not padding
    context: SequenceParallelContext


def shard_micro_batch(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                      real: torch.Tensor, *, dims: ParallelDims, rank: int, layout: str, pad_id: int,
                      groups: dict, kernel: str | None = None, chunks: int = 1) -> ShardedBatch:
    """Shard full `[B, L]` rows (labels already shifted) for `rank`; `real` marks non-padding tokens.

    `groups` maps "sp_ring" / "sp_ulysses" to process groups; `chunks`: sequence-chunked layers' chunk count
    (sharding.py's chunked layout).
    """
    ring, ulysses = dims.sp_ring, dims.sp_ulysses
    multiple = padding_multiple(layout, ring, ulysses, chunks)
    input_ids, labels, position_ids, extra = pad_to_multiple(input_ids, labels, position_ids, multiple,
                                                             pad_id)
    if extra:
        real = torch.cat([real, torch.zeros(real.shape[0], extra, dtype=real.dtype)], dim=1)
    ring_rank, ulysses_rank = dims.coordinate(rank, "sp_ring"), dims.coordinate(rank, "sp_ulysses")
    shard = lambda t: shard_sequence(t, layout, ring, ring_rank, ulysses, ulysses_rank, chunks=chunks)  # noqa: E731
    bounds = tuple(tuple(row) for row in document_bounds(position_ids))
    context = SequenceParallelContext(
        layout=layout, seq_len=input_ids.shape[1], doc_bounds=bounds, ring=ring, ring_rank=ring_rank,
        ring_group=groups.get("sp_ring"), ulysses=ulysses, ulysses_rank=ulysses_rank,
        ulysses_group=groups.get("sp_ulysses"), kernel=kernel, chunks=chunks)
    return ShardedBatch(shard(input_ids), shard(labels), shard(position_ids), int(shard(real).sum()), context)
