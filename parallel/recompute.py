"""Activation recomputation and activation offload, applied by `parallelize()` / the backends.

Recomputation wraps modules in torch's non-reentrant activation checkpointing
(`checkpoint_wrapper`): `full` wraps every decoder layer, `selective` wraps every k-th layer or,
when sub-module names are given (e.g. `mlp`), those sub-modules of every layer. `full` with sub-module
names nests: those sub-modules are checkpoints inside each layer's checkpoint, so that a layer's
recomputation in backward keeps only their inputs and each one's activations exist only during its own
backward (one more forward of each). Checkpoint offload
keeps the inputs of those checkpointed modules (the hidden states a checkpoint saves for its
recomputation) in an offload tier (`offload.py`: host memory, or files on disk), reading each one ahead
while backward runs the layer after it. Activation offload
keeps every tensor autograd saves in host memory (`torch.autograd.graph.save_on_cpu`; pinned on GPU).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

from .layout import Layout
from .offload import OffloadTier, make_tier


class _Saved:
    """A checkpoint input in the tier, and (weakly: it may be gone) the one saved before it."""

    __slots__ = ("handle", "before", "__weakref__")

    def __init__(self, handle: Any, before: weakref.ref | None) -> None:
        self.handle, self.before = handle, before


class CheckpointOffload:
    """Saved-tensor hooks that keep checkpoint inputs in `tier` and read them ahead: backward takes them back
    in the reverse order of forward (layer k's input, then layer k-1's), so when one is taken, the read of
    the one saved before it starts, and runs while layer k recomputes and runs its backward."""

    def __init__(self, tier: OffloadTier) -> None:
        self.tier = tier
        self._last: weakref.ref | None = None

    def pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(self.tier.put(tensor), self._last)
        self._last = weakref.ref(saved)
        return saved

    def unpack(self, saved: _Saved) -> torch.Tensor:
        before = saved.before() if saved.before is not None else None
        if before is not None:
            self.tier.prefetch(before.handle)
        return self.tier.get(saved.handle)


def offloaded_checkpoint(module: nn.Module, *args: Any, offload: CheckpointOffload, **kwargs: Any) -> Any:
    """Non-reentrant checkpoint whose saved inputs go to `offload`'s tier.

    The checkpoint saves its tensor arguments (here the hidden states) through the saved-tensor
    hooks active when it is called, while the tensors saved inside the checkpointed region go
    through the checkpoint's own hooks: so these hooks move exactly the checkpointed inputs.
    """
    with torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack):
        return checkpoint(module, *args, use_reentrant=False, **kwargs)


def _wrap(module: nn.Module, offload: CheckpointOffload | None = None) -> nn.Module:
    if offload is not None:
        return checkpoint_wrapper(module, checkpoint_fn=functools.partial(offloaded_checkpoint, offload=offload))
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_recompute(layers: nn.Module, layout: Layout) -> int:
    """Wrap in place as `layout.recompute` / `recompute_every` / `recompute_modules` /
    `offload_checkpoints` say; returns how many modules now recompute their activations in backward.

    `layers`: the model's ModuleList, or a pipeline stage's ModuleDict keyed by the layers' indices in
    the whole model (selective `every` counts those indices, so a layer recomputes under any split).
    """
    if layout.recompute == "none":
        return 0
    # One tier for all of this part's checkpoints (a directory per process and part with the disk tier).
    offload = (CheckpointOffload(make_tier(layout.disk_dir, prefix="checkpoints-")) if layout.offload_checkpoints
               else None)
    wrapped = 0
    for index, layer in list(layers.named_children()):
        if layout.recompute_modules:
            # selective: these sub-modules instead of whole layers. full: these sub-modules inside the layer's
            # checkpoint too (nested), so that its backward holds one sub-module's activations at a time.
            inner_offload = offload if layout.recompute == "selective" else None
            for name in layout.recompute_modules:
                if not isinstance(getattr(layer, name, None), nn.Module):
                    raise ValueError(f"memory.recompute_modules: decoder layer has no sub-module {name!r}")
                setattr(layer, name, _wrap(getattr(layer, name), inner_offload))
                wrapped += 1
        if layout.recompute == "full" or (not layout.recompute_modules and int(index) % layout.recompute_every == 0):
            setattr(layers, index, _wrap(layer, offload))
            wrapped += 1
    return wrapped


def activation_offload(enabled: bool) -> contextlib.AbstractContextManager:
    """Saved activations go to host memory for the duration (forward); backward brings them back."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
