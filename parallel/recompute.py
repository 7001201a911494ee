"""Activation recomputation and activation offload, applied by `parallelize()` / the backends.

Recomputation wraps modules in torch's non-reentrant activation checkpointing
(`checkpoint_wrapper`): `full` wraps every decoder layer, `selective` wraps every k-th layer or,
when sub-module names are given (e.g. `mlp`), those sub-modules of every layer. Checkpoint offload
keeps the inputs of those checkpointed modules (the hidden states a checkpoint saves for its
recomputation) in host memory. Activation offload keeps every tensor autograd saves in host memory
(`torch.autograd.graph.save_on_cpu`; pinned on GPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class RecomputeSettings:
    mode: str = "none"  # none | full | selective
    every: int = 1  # selective: every k-th decoder layer
    modules: tuple[str, ...] = ()  # selective: these sub-modules of every layer instead
    offload_checkpoints: bool = False  # the checkpointed modules' inputs live in host memory
    tiled_mlp_chunk: int = 0  # tokens per TiledMLP chunk (parallel/tiling.py); 0: off
    tiled_loss_chunk: int = 0  # tokens per tiled logits + loss chunk; 0: off


def _to_host(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
    # Always a copy, on CPU too: the same code path runs everywhere and the device tensor is released.
    pinned = tensor.device.type == "cuda"
    host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
    host.copy_(tensor, non_blocking=pinned)
    return tensor.device, host


def _from_host(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
    device, host = packed
    return host.to(device, non_blocking=host.is_pinned())


def offloaded_checkpoint(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Non-reentrant checkpoint whose saved inputs go to host memory.

    The checkpoint saves its tensor arguments (here the hidden states) through the saved-tensor
    hooks active when it is called, while the tensors saved inside the checkpointed region go
    through the checkpoint's own hooks: so these hooks move exactly the checkpointed inputs.
    """
    with torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host):
        return checkpoint(module, *args, use_reentrant=False, **kwargs)


def _wrap(module: nn.Module, offload: bool = False) -> nn.Module:
    if offload:
        return checkpoint_wrapper(module, checkpoint_fn=offloaded_checkpoint)
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_recompute(layers: nn.Module, settings: RecomputeSettings) -> int:
    """Wrap in place; returns how many modules now recompute their activations in backward.

    `layers`: the model's ModuleList, or a pipeline stage's ModuleDict keyed by the layers' indices in
    the whole model (selective `every` counts those indices, so a layer recomputes under any split).
    """
    if settings.mode == "none":
        return 0
    wrapped = 0
    for index, layer in list(layers.named_children()):
        if settings.mode == "selective" and settings.modules:
            for name in settings.modules:
                if not isinstance(getattr(layer, name, None), nn.Module):
                    raise ValueError(f"memory.recompute_modules: decoder layer has no sub-module {name!r}")
                setattr(layer, name, _wrap(getattr(layer, name), settings.offload_checkpoints))
                wrapped += 1
        elif settings.mode == "full" or int(index) % settings.every == 0:
            setattr(layers, index, _wrap(layer, settings.offload_checkpoints))
            wrapped += 1
    return wrapped


def activation_offload(enabled: bool) -> contextlib.AbstractContextManager:
    """Saved activations go to host memory for the duration (forward); backward brings them back."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
