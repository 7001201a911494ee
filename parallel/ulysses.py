"""Ulysses sequence parallelism: all-to-all from sequence-sharded to head-sharded and back.

Before attention each rank holds `[B, H, L/U, D]` for all heads; after the all-to-all it holds
`[B, H/U, L, D]` — all positions of its group of heads — and after attention the inverse all-to-all
restores the sequence sharding. With fewer KV heads than the degree (GQA), KV heads are replicated
the minimal amount (to lcm(Hkv, U)); autograd sums their gradients back.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """All-to-all over dim 0 of a `[U, ...]` tensor; its own transpose, so backward is the same."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        # empty_like would copy the (permuted) strides of x; the collective needs contiguous buffers.
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def replicate_kv_heads(kv_heads: int, q_heads: int, degree: int) -> int:
    """How many copies of each KV head make the count divisible by the degree (1: none needed)."""
    if q_heads % degree:
        raise ValueError(f"{q_heads} query heads are not divisible by the Ulysses degree {degree}")
    copies = math.lcm(kv_heads, degree) // kv_heads
    if q_heads % (kv_heads * copies):
        raise ValueError(f"cannot spread {kv_heads} KV heads over Ulysses degree {degree} with "
                         f"{q_heads} query heads")
    return copies


def sequence_to_heads(tensors: list[torch.Tensor], group: dist.ProcessGroup, degree: int
                      ) -> list[torch.Tensor]:
    """`[B, L/U, H_i, D]` (sequence-sharded, all heads) → `[B, L, H_i/U, D]` (head-sharded, whole sequence).

    The tensors (q, k, v) travel in one all-to-all. Working in `[B, S, H, D]` — the layout the
    projections produce — makes the receive side a view for batch 1 and leaves one send copy.
    """
    b, s, _, d = tensors[0].shape
    parts = [t.reshape(b, s, degree, t.shape[2] // degree, d).permute(2, 0, 1, 3, 4) for t in tensors]
    heads = [p.shape[3] for p in parts]
    recv = _AllToAll.apply(torch.cat(parts, dim=3), group)  # [U (sequence part), B, s, Σh, D]
    gathered = recv.permute(1, 0, 2, 3, 4).reshape(b, degree * s, sum(heads), d)
    return list(gathered.split(heads, dim=2))


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """`[B, L, H/U, D]` (head-sharded) → `[B, L/U, H, D]` (sequence-sharded)."""
    b, length, h, d = x.shape
    send = x.reshape(b, degree, length // degree, h, d).transpose(0, 1)
    recv = _AllToAll.apply(send, group)  # [U (head group), B, L/U, H/U, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, length // degree, degree * h, d)
