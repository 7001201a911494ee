"""The loss: exactly the token mean over all ranks and micro-batches of a step.

Each micro-batch contributes `sum of its token losses`; the step's divisor is the number of
counted tokens over every rank and micro-batch, all-reduced once before the forward passes. So
padding, masking and the split over ranks never change the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from longtune.parallel.loss_parallel import vocab_parallel_loss_sum

from .data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over the counted tokens (labels are already shifted), in fp32 (float64 logits, of
    `longtune parity`'s reference, stay float64). Logits sharded over the vocabulary (tensor parallelism's
    lm_head, a DTensor) give the same sum without any rank gathering them (parallel/loss_parallel.py)."""
    if isinstance(logits, DTensor):
        return vocab_parallel_loss_sum(logits, labels, IGNORE_INDEX)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
