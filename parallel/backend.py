"""The training backend contract and its registry.

A backend owns the wrapped model, the optimizer and the LR schedule: it runs a step's micro-batches
(forward and backward, through the pipeline schedule where there is one), steps, checkpoints and hands
out a full state dict for export. `native` is DDP / FSDP2 with torch AdamW; `deepspeed` is a ZeRO
engine. The training loop (longtune.train) sees only this interface.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .dims import ParallelDims, all_reduce_sum
from .layout import Layout
from .micro_batch import MicroBatchInputs, forward_backward
from .tiling import LossFn


@dataclass(frozen=True)
class BackendSettings:
    """The optimizer and its LR schedule; every parallel and memory decision is in the `Layout`."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    lr_multiplier: Callable[[int], float]
    deepspeed_config: str | None = None  # the deepspeed backend: a user JSON added to the generated config


ModelFactory = Callable[[torch.device | str], nn.Module]
"""Builds the model on a device (`"meta"`: structure only); called by the backend."""


@dataclass(frozen=True)
class StepTotals:
    """One step's sums over the world, each row counted once."""

    loss_sum: float  # token losses
    counted_tokens: float  # tokens with a label (the loss is their mean)
    real_tokens: float  # tokens that are not padding


class TrainingBackend(ABC):
    def __init__(self, settings: BackendSettings, layout: Layout, dims: ParallelDims,
                 device: torch.device) -> None:
        self.settings = settings
        self.layout = layout
        self.dims = dims
        self.device = device

    @property
    @abstractmethod
    def loss_multiplier(self) -> float:
        """Factor that turns `sum of local token losses / global token count` into the loss whose
        backward gives this backend the exact global token-mean gradient (it averages over dp)."""

    @abstractmethod
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits for one micro-batch; with a `TiledLMHead` inside `lm_head_computes_loss`, its loss sum."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Accumulate gradients; they are synchronized over dp on the last micro-batch of a step."""

    def run_micro_batches(self, micro: list[MicroBatchInputs], loss_fn: LossFn) -> StepTotals:
        """Forward and backward of the step's micro-batches, each one's gradient that of its share of the
        global token-mean loss; returns the step's totals. Collective over the world."""
        dims = self.dims
        counted, = all_reduce_sum([sum(mb.counted_tokens for mb in micro)], self.device)
        # Every tp rank and pipeline stage of a replica holds the same rows: the world sum counts them
        # tp × pp times.
        counted /= dims.tp * dims.pp
        local_loss = self._forward_backward(micro, loss_fn, self.loss_multiplier / max(counted, 1.0))
        # Under pipeline parallelism the last stage computes the loss: its ranks report loss and tokens.
        rank = dist.get_rank() if dist.is_initialized() else 0
        last_stage = dims.coordinate(rank, "pp") == dims.pp - 1
        reported = [local_loss, float(sum(mb.real_tokens for mb in micro))] if last_stage else [0.0, 0.0]
        loss_sum, real = (v / dims.tp for v in all_reduce_sum(reported, self.device))
        return StepTotals(loss_sum, counted, real)

    def _forward_backward(self, micro: list[MicroBatchInputs], loss_fn: LossFn, scale: float) -> float:
        """This rank's sum of token losses over the step's micro-batches (pipeline backends override it)."""
        return forward_backward(micro, self.forward, self.backward, loss_fn, scale,
                                offload_activations=self.layout.offload_activations)

    @abstractmethod
    def step(self) -> float:
        """Clip, optimizer step, LR step, zero grads; returns the global gradient norm before clipping."""

    @property
    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def save_checkpoint(self, path: Path) -> None:
        """Collective: write model, optimizer and scheduler state under `path`."""

    @abstractmethod
    def load_checkpoint(self, path: Path) -> None: ...

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the unsharded model weights on CPU on rank 0, None on the other ranks."""

    @abstractmethod
    def train_mode(self) -> None: ...


BACKENDS: dict[str, str] = {
    "native": "longtune.parallel.native_backend:NativeBackend",
    "deepspeed": "longtune.parallel.deepspeed_backend:DeepSpeedBackend",
}
"""`parallel.backend` → the class implementing it, imported when chosen (deepspeed is a heavy import); the
implementations import this module, never the other way round."""


def create_backend(name: str, settings: BackendSettings, layout: Layout, dims: ParallelDims,
                   device: torch.device, build_model: ModelFactory) -> TrainingBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(sorted(BACKENDS))}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(settings, layout, dims, device, build_model)
