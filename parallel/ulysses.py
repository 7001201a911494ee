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


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """`[B, H, L/U, D]` (sequence-sharded) → `[B, H/U, L, D]` (head-sharded)."""
    b, h, s, d = x.shape
    send = x.reshape(b, degree, h // degree, s, d).permute(1, 0, 2, 3, 4)
    recv = _AllToAll.apply(send, group)  # [U (source rank = sequence part), B, H/U, L/U, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // degree, degree * s, d)


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """`[B, H/U, L, D]` (head-sharded) → `[B, H, L/U, D]` (sequence-sharded)."""
    b, hl, s, d = x.shape
    send = x.reshape(b, hl, degree, s // degree, d).permute(2, 0, 1, 3, 4)
    recv = _AllToAll.apply(send, group)  # [U (source rank = head group), B, H/U, L/U, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, degree * hl, s // degree, d)
