"""Sequence tiling (ALST's TiledMLP and tiled loss): the decoder MLP, and the logits with the loss,
computed in chunks of sequence positions that are recomputed in backward, so that only one chunk's MLP
intermediates or logits exist at a time and the full length × vocabulary logits never do.

Both are wrappers that keep the original module as their child `_checkpoint_wrapped_module`
(torch's `ActivationWrapper`, like the recomputation wrappers): state dicts, DCP checkpoints and the
HF export keep the original keys. Each loss chunk is a non-reentrant checkpoint; the MLP is one autograd
function over all chunks that writes the input gradient in place (`_TiledMLPFunction`; under ZeRO-3 a
checkpoint per chunk). Either way each parameter's gradient is accumulated once, as DDP, FSDP2 and ZeRO
expect.

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
from torch.distributed.tensor import DTensor
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


class _TiledMLPFunction(torch.autograd.Function):
    """The MLP over sequence chunks, forward without autograd; backward recomputes one chunk at a time.

    Backward writes each chunk's input gradient into one preallocated tensor (chunks as separate autograd
    inputs would hold every chunk's gradient and then their concatenation: two copies of `[B, L, H]`), and
    returns the parameters' gradients summed over the chunks as this function's own outputs, so that
    autograd accumulates each parameter's gradient once (DDP's, FSDP2's, ZeRO's and gradient offload's hooks
    fire once). The chunks recompute under the autocast state of the forward. Position-wise and
    deterministic MLPs only (no dropout: the recomputation would draw other masks)."""

    @staticmethod
    def forward(ctx, mlp: nn.Module, chunk: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp, ctx.chunk = mlp, chunk
        ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                        for kind in {x.device.type, "cpu"}]
        ctx.save_for_backward(x)  # the parameters are the module's, read again in backward (below)
        ctx.num_params = len(params)
        # Each chunk's output into one tensor (a list of them and their concatenation would be two).
        out, start = None, 0
        for part in _sequence_chunks(x, chunk):
            y = mlp(part)
            if out is None:
                out = y.new_empty((y.shape[0], x.shape[1], *y.shape[2:]))
            out.narrow(1, start, y.shape[1]).copy_(y)
            start += y.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        # The module's parameters now (the same tensors as in forward, FSDP2's unsharded ones included): saved
        # tensors would go through saved-tensor hooks (offload) and come back as copies autograd cannot use.
        params = list(ctx.mlp.parameters())
        if len(params) != ctx.num_params:
            raise RuntimeError(f"tiled MLP: {ctx.num_params} parameters in forward, {len(params)} in backward")
        wants_x, wants = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        grad_x = torch.empty_like(x) if wants_x else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        targets = [i for i, w in enumerate(wants) if w]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for kind, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            start = 0
            for part, g in zip(_sequence_chunks(x, ctx.chunk), _sequence_chunks(grad_out, ctx.chunk), strict=True):
                part = part.detach().requires_grad_(wants_x)
                out = ctx.mlp(part)
                got = torch.autograd.grad(out, [part] * wants_x + [params[i] for i in targets], g,
                                          allow_unused=True)
                if wants_x:
                    grad_x.narrow(1, start, part.shape[1]).copy_(got[0])
                for i, gp in zip(targets, got[wants_x:], strict=True):
                    if gp is not None:
                        grads[i] = gp if grads[i] is None else grads[i].add_(gp)
                start += part.shape[1]
                del out, got
        return None, None, grad_x, *grads


class TiledMLP(ActivationWrapper):
    """A position-wise MLP run on `chunk` sequence positions at a time; backward recomputes one chunk
    at a time and writes the input gradient in place (`_TiledMLPFunction`)."""

    def __init__(self, mlp: nn.Module, chunk: int) -> None:
        super().__init__(mlp)
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self._checkpoint_wrapped_module
        params = list(mlp.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            # ZeRO-3 gathers partitioned parameters in module hooks that a recomputation inside a custom
            # backward does not drive: a checkpoint per chunk instead (autograd then assembles the input
            # gradient from the chunks' gradients, one more [B, L, H] for that moment).
            outs = [checkpoint(mlp, part, use_reentrant=False) for part in _sequence_chunks(x, self.chunk)]
            return torch.cat(outs, dim=1)
        return _TiledMLPFunction.apply(mlp, self.chunk, x, *params)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"


class TiledLMHead(ActivationWrapper):
    """The output projection. Inside `lm_head_computes_loss(labels, loss_fn)` it returns the sum of
    the token losses instead of logits (a 0-dim tensor, in the model output's `logits` field), computed
    `chunk` sequence positions at a time; elsewhere (evaluation, generation) it returns ordinary logits.

    `chunk=None`: the whole sequence at once, not recomputed. Tensor parallelism installs the head so with a
    vocabulary-parallel lm_head (its logits a DTensor sharded over the vocabulary): the loop's `loss_fn`
    then computes the loss on the shards, and outside the loss context the logits are gathered whole.

    The loss is computed inside the model's forward so that every wrapper sees an ordinary forward:
    FSDP2 has the root's parameters (lm_head) unsharded, ZeRO-3 gathers lm_head's weight for the call
    and again when backward recomputes a chunk.
    """

    def __init__(self, head: nn.Module, chunk: int | None) -> None:
        super().__init__(head)
        self.chunk = chunk
        self._final_norm: tuple[nn.Module, ...] = ()  # a `DeferredNorm`'s norm, run in each chunk (not a child)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self._checkpoint_wrapped_module
        pending = _PENDING_LOSS.get()
        if pending is None:
            logits = head(hidden)
            return logits.full_tensor() if isinstance(logits, DTensor) else logits
        labels, loss_fn = pending
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"tiled loss: labels {tuple(labels.shape)} for hidden states "
                             f"{tuple(hidden.shape)}")

        def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for norm in self._final_norm:
                h = norm(h)
            return loss_fn(head(h), y)

        if self.chunk is None:
            return chunk_loss(hidden, labels)

        # Chunks with only ignored labels are computed too (their loss is 0): skipping them would make
        # the number of lm_head calls differ between ranks (see the module docstring).
        parts = [checkpoint(chunk_loss, h, y, use_reentrant=False)
                 for h, y in zip(_sequence_chunks(hidden, self.chunk), _sequence_chunks(labels, self.chunk),
                                 strict=True)]
        return torch.stack(parts).sum()

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"


class DeferredNorm(ActivationWrapper):
    """The model's final norm, which while a tiled loss is pending passes the hidden states through unchanged:
    the `TiledLMHead` applies the norm in each of its chunks, inside the chunk's checkpoint. The norm is
    position-wise, so the result is the same; what the forward keeps for backward is the norm's input alone
    instead of its input, its fp32 intermediate and its output (three `[B, L, H]` become one). Elsewhere
    (evaluation, generation) it is the norm."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if _PENDING_LOSS.get() is not None:
            return hidden
        return self._checkpoint_wrapped_module(hidden)


@contextlib.contextmanager
def lm_head_computes_loss(labels: torch.Tensor | None, loss_fn: LossFn) -> Iterator[None]:
    """For the forward passes inside: a `TiledLMHead` returns `loss_fn` summed over `labels` (the
    shifted labels of this rank's tokens); a plain lm_head returns its logits as always. `labels=None`
    changes nothing."""
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


def apply_tiled_loss(model: nn.Module, chunk: int, *, defer_norm: bool = True) -> bool:
    """Wrap the causal LM's `lm_head` in a `TiledLMHead` of `chunk` positions (0: off); a head that computes
    the loss already (tensor parallelism's) gets the chunk. With `defer_norm` the final norm
    (`model.model.norm`) moves into the chunks too (`DeferredNorm`); tensor parallelism passes False, since
    its plan gathers the sequence in the norm's input hook."""
    if chunk <= 0:
        return False
    head = install_loss_head(model, chunk, "memory.tiled_loss")
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if defer_norm and isinstance(norm, nn.Module) and not isinstance(norm, DeferredNorm):
        inner.norm = DeferredNorm(norm)
        head._final_norm = (norm,)
    return True


def install_loss_head(model: nn.Module, chunk: int | None, feature: str) -> TiledLMHead:
    """The causal LM's `lm_head` as a `TiledLMHead` of `chunk` positions (None: the whole sequence at once),
    wrapping it unless it is one already. `feature` names the setting that asks for it in errors."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{feature}: {type(model).__name__} has no lm_head")
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        # These families change the logits after lm_head, which would then act on the loss.
        if getattr(config, name, None) is not None:
            raise ValueError(f"{feature}: the model's config sets {name}, which a loss computed in lm_head "
                             "does not apply")
    if isinstance(head, TiledLMHead):
        head.chunk = chunk
    else:
        model.lm_head = head = TiledLMHead(head, chunk)
    return head
