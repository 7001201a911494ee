"""Sequence tiling (ALST's TiledMLP and tiled loss): the decoder MLP, and the logits with the loss,
computed in chunks of sequence positions that are recomputed in backward, so that only one chunk's MLP
intermediates or logits exist at a time and the full length × vocabulary logits never do.

Both are wrappers that keep the original module as their child `_checkpoint_wrapped_module`
(torch's `ActivationWrapper`, like the recomputation wrappers): state dicts, DCP checkpoints and the
HF export keep the original keys. Each chunk is a non-reentrant checkpoint, so the gradients are the
ordinary autograd ones (each parameter's gradient is accumulated once, as DDP, FSDP2 and ZeRO expect).

The number of chunks depends only on the micro-batch shape, which is the same on every rank (the
sequence-parallel shards are padded to equal lengths): ZeRO-3 gathers the wrapped module's weights
once per chunk, and every rank must gather the same number of times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
from torch.utils.checkpoint import checkpoint

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits [B, c, V], labels [B, c]) → sum of the token losses: the training loop's `token_loss_sum`."""

_PENDING_LOSS: ContextVar[tuple[torch.Tensor, LossFn] | None] = ContextVar("longtune_tiled_loss", default=None)


def _sequence_chunks(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """`x` [B, L, ...] split along the sequence into views of `chunk` positions (every row).

    The sequence dimension, not flattened tokens: module hooks that expect [B, L, ...] (e.g. tensor
    parallelism's input layouts) keep seeing that shape.
    """
    return x.split(chunk, dim=1)


class TiledMLP(ActivationWrapper):
    """A position-wise MLP run on `chunk` sequence positions at a time; backward recomputes one chunk
    at a time."""

    def __init__(self, mlp: nn.Module, chunk: int) -> None:
        super().__init__(mlp)
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [checkpoint(self._checkpoint_wrapped_module, part, use_reentrant=False)
                for part in _sequence_chunks(x, self.chunk)]
        return torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"


class TiledLMHead(ActivationWrapper):
    """The output projection. Inside `lm_head_computes_loss(labels, loss_fn)` it returns the sum of
    the token losses instead of logits (a 0-dim tensor, in the model output's `logits` field), computed
    `chunk` sequence positions at a time; elsewhere (evaluation, generation) it returns ordinary logits.

    The loss is computed inside the model's forward so that every wrapper sees an ordinary forward:
    FSDP2 has the root's parameters (lm_head) unsharded, ZeRO-3 gathers lm_head's weight for the call
    and again when backward recomputes a chunk.
    """

    def __init__(self, head: nn.Module, chunk: int) -> None:
        super().__init__(head)
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pending = _PENDING_LOSS.get()
        if pending is None:
            return self._checkpoint_wrapped_module(hidden)
        labels, loss_fn = pending
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"tiled loss: labels {tuple(labels.shape)} for hidden states "
                             f"{tuple(hidden.shape)}")

        def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(self._checkpoint_wrapped_module(h), y)

        # Chunks with only ignored labels are computed too (their loss is 0): skipping them would make
        # the number of lm_head calls differ between ranks (see the module docstring).
        parts = [checkpoint(chunk_loss, h, y, use_reentrant=False)
                 for h, y in zip(_sequence_chunks(hidden, self.chunk), _sequence_chunks(labels, self.chunk),
                                 strict=True)]
        return torch.stack(parts).sum()

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"


@contextlib.contextmanager
def lm_head_computes_loss(labels: torch.Tensor | None, loss_fn: LossFn) -> Iterator[None]:
    """For the forward passes inside: a `TiledLMHead` returns `loss_fn` summed over `labels` (the
    shifted labels of this rank's tokens). `labels=None` changes nothing."""
    if labels is None:
        yield
        return
    token = _PENDING_LOSS.set((labels, loss_fn))
    try:
        yield
    finally:
        _PENDING_LOSS.reset(token)


def apply_tiled_mlp(layers: nn.Module, chunk: int) -> int:
    """Wrap every decoder layer's `mlp` in a `TiledMLP` of `chunk` positions (0: off); returns how many.

    `layers`: the model's ModuleList or a pipeline stage's ModuleDict of layers."""
    if chunk <= 0:
        return 0
    for layer in layers.children():
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"memory.tiled_mlp: decoder layer {type(layer).__name__} has no mlp sub-module")
        if not isinstance(mlp, TiledMLP):
            layer.mlp = TiledMLP(mlp, chunk)
    return len(layers)


def apply_tiled_loss(model: nn.Module, chunk: int) -> bool:
    """Wrap the causal LM's `lm_head` in a `TiledLMHead` of `chunk` positions (0: off)."""
    if chunk <= 0:
        return False
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"memory.tiled_loss: {type(model).__name__} has no lm_head")
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        # These families change the logits after lm_head, which would then act on the loss.
        if getattr(config, name, None) is not None:
            raise ValueError(f"memory.tiled_loss: the model's config sets {name}, which tiled loss does "
                             "not apply")
    if not isinstance(head, TiledLMHead):
        model.lm_head = TiledLMHead(head, chunk)
    return True
