"""One step's micro-batches through a model: the inputs each rank feeds, and forward + backward of them.

The backends run a step's micro-batches with `forward_backward` (pipeline parallelism hands them to its
schedule instead); `longtune parity` runs the same function on its unwrapped model, so the step it checks is
the one training runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .recompute import activation_offload
from .tiling import LossFn, lm_head_computes_loss


@dataclass(frozen=True)
class MicroBatchInputs:
    """One micro-batch as this rank feeds it: the model's forward kwargs (`input_ids`, `position_ids`, and
    e.g. `sp_context`, which the decoder layers pass on to attention), the shifted labels of this rank's
    tokens, and how many of those tokens are real (not padding) and counted (have a label)."""

    inputs: dict
    labels: torch.Tensor
    real_tokens: int = 0
    counted_tokens: int = 0


def forward_backward(micro: Sequence[MicroBatchInputs], forward: Callable[..., torch.Tensor],
                     backward: Callable[[torch.Tensor, bool], None], loss_fn: LossFn, scale: float, *,
                     offload_activations: bool = False) -> float:
    """Forward and backward of each micro-batch in turn; returns the sum of their token losses.

    `forward(**inputs)` gives logits, or where lm_head computes the loss (a `TiledLMHead`: tiled loss, tensor
    parallelism's vocabulary-parallel head) the loss sum itself, a 0-dim tensor; `backward(loss,
    last_micro_batch)` accumulates the gradient of `loss_fn × scale` (gradients are synchronized on the last
    micro-batch). With `offload_activations` what the forward saves for backward waits in host memory."""
    total = 0.0
    for i, mb in enumerate(micro):
        with activation_offload(offload_activations), lm_head_computes_loss(mb.labels, loss_fn):
            out = forward(**mb.inputs)
        loss_sum = out if out.dim() == 0 else loss_fn(out, mb.labels)
        backward(loss_sum * scale, i == len(micro) - 1)
        total += loss_sum.item()
    return total
