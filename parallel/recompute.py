"""Activation recomputation and activation offload, applied by `parallelize()` / the backends.

Recomputation wraps modules in torch's non-reentrant activation checkpointing
(`checkpoint_wrapper`): `full` wraps every decoder layer, `selective` wraps every k-th layer or,
when sub-module names are given (e.g. `mlp`), those sub-modules of every layer. Activation offload
keeps the tensors autograd saves in host memory (`torch.autograd.graph.save_on_cpu`; pinned on GPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper


@dataclass(frozen=True)
class RecomputeSettings:
    mode: str = "none"  # none | full | selective
    every: int = 1  # selective: every k-th decoder layer
    modules: tuple[str, ...] = ()  # selective: these sub-modules of every layer instead


def _wrap(module: nn.Module) -> nn.Module:
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_recompute(layers: nn.ModuleList, settings: RecomputeSettings) -> int:
    """Wrap in place; returns how many modules now recompute their activations in backward."""
    if settings.mode == "none":
        return 0
    wrapped = 0
    for i, layer in enumerate(layers):
        if settings.mode == "selective" and settings.modules:
            for name in settings.modules:
                if not isinstance(getattr(layer, name, None), nn.Module):
                    raise ValueError(f"memory.recompute_modules: decoder layer has no sub-module {name!r}")
                setattr(layer, name, _wrap(getattr(layer, name)))
                wrapped += 1
        elif settings.mode == "full" or i % settings.every == 0:
            layers[i] = _wrap(layer)
            wrapped += 1
    return wrapped


def activation_offload(enabled: bool) -> contextlib.AbstractContextManager:
    """Saved activations go to host memory for the duration (forward); backward brings them back."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
