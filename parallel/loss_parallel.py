"""Cross-entropy on vocabulary-parallel logits (Megatron's vocab-parallel cross-entropy): each tensor-parallel
rank holds the logits of its slice of the vocabulary, and every token's loss comes from two all-reduces over
the tp group (the row maximum, then the sum of exponentials together with the target's logit), so no rank
ever holds the full vocabulary's logits.

An autograd function of its own rather than torch's `loss_parallel()` context: that one needs the backward
inside the context too, and a tiled loss recomputes its chunks in backward, wherever the caller runs it.
The backward needs no communication: each rank's gradient is its slice of softmax − one-hot.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over the counted tokens of `logits` [N, v] (this rank's vocabulary slice, which
    starts at `vocab_start`) and `labels` [N] (global token ids, the same on every rank)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, ignore_index: int,
                group: dist.ProcessGroup) -> torch.Tensor:
        counted = labels != ignore_index
        target = labels - vocab_start
        owned = counted & (target >= 0) & (target < logits.shape[-1])  # the target's logit is on this rank
        target = torch.where(owned, target, 0)
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = logits - row_max[:, None]
        target_logit = torch.where(owned, exp.gather(-1, target[:, None]).squeeze(-1), 0.0)
        exp.exp_()
        sums = torch.stack([exp.sum(dim=-1), target_logit])
        dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums
        # log Σ exp(x - max) - (x_target - max) = -log softmax(x)_target
        loss = torch.where(counted, sum_exp.log() - target_logit, 0.0).sum()
        softmax = exp.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, target, owned, counted)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, target, owned, counted = ctx.saved_tensors
        grad = softmax  # in place: the saved softmax is needed once
        grad.scatter_add_(-1, target[:, None], -owned.to(grad.dtype)[:, None])
        grad.mul_(counted.to(grad.dtype)[:, None] * grad_loss)
        return grad, None, None, None, None


def vocab_parallel_loss_sum(logits: DTensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum of cross-entropy over the labels that are not `ignore_index`, in fp32 (float64 stays float64).

    `logits` [..., V]: a DTensor sharded on the vocabulary (last) dim over a 1-D mesh (the tp group);
    `labels` [...]: a plain tensor, the same on every rank. Returns a plain 0-dim tensor, the whole loss on
    every rank; the gradient reaches each rank's logits shard only."""
    vocab_dim = logits.ndim - 1
    placement = logits.placements[0]
    if logits.device_mesh.ndim != 1 or not (isinstance(placement, Shard) and placement.dim % logits.ndim == vocab_dim):
        raise ValueError(f"vocab-parallel loss: logits must be sharded on their last dim over one mesh dim, "
                         f"got placements {logits.placements} on a {logits.device_mesh.ndim}-D mesh")
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, (Shard(vocab_dim),))
    local = logits.to_local()
    local = local.to(torch.promote_types(local.dtype, torch.float32))
    return _VocabParallelCrossEntropy.apply(local.reshape(-1, local.shape[-1]), labels.reshape(-1),
                                            offset[vocab_dim], ignore_index, logits.device_mesh.get_group())
