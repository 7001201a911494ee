"""The training backend contract and its registry.

A backend owns the wrapped model, the optimizer and the LR schedule: it runs the forward pass,
accumulates gradients over micro-batches, steps, checkpoints and hands out a full state dict for
export. `native` is DDP / FSDP2 with torch AdamW; `deepspeed` is a ZeRO engine. The training loop
(longtune.train) sees only this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .dims import ParallelDims
from .recompute import RecomputeSettings


@dataclass(frozen=True)
class BackendSettings:
    """What a backend needs to know, taken from the recipe by the caller."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    lr_multiplier: Callable[[int], float]
    grad_accum: int
    micro_batch_size: int
    bf16: bool = False
    fsdp: bool = False
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    optimizer_swap: bool = False  # native: AdamW's state out of the device between steps (offload.py)
    optimizer_swap_dir: str | None = None  # its tier: None host memory, else files under this directory
    gradient_offload: bool = False  # native, one process: each gradient out of the device once accumulated
    gradient_offload_dir: str | None = None  # its tier, as optimizer_swap_dir
    deepspeed_config: str | None = None
    recompute: RecomputeSettings = RecomputeSettings()
    tp_sequence_parallel: bool = True
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1


ModelFactory = Callable[[torch.device | str], nn.Module]
"""Builds the model on a device (`"meta"`: structure only); called by the backend."""


class TrainingBackend(ABC):
    def __init__(self, settings: BackendSettings, dims: ParallelDims, device: torch.device) -> None:
        self.settings = settings
        self.dims = dims
        self.device = device

    @property
    @abstractmethod
    def loss_multiplier(self) -> float:
        """Factor that turns `sum of local token losses / global token count` into the loss whose
        backward gives this backend the exact global token-mean gradient (it averages over dp)."""

    @abstractmethod
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits for one micro-batch; with a tiled lm_head inside `lm_head_computes_loss`, its loss sum."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Accumulate gradients; they are synchronized over dp on the last micro-batch of a step."""

    def pipeline_step(self, micro_batches: list, loss_fn: Callable, loss_scale: float) -> float:
        """Pipeline parallelism: forward and backward of all the step's micro-batches (`StageInputs`) through
        the schedule, each micro-batch's gradient that of `loss_fn(logits, labels) × loss_scale`; returns
        this rank's sum of token losses (0 on ranks without the last stage)."""
        raise NotImplementedError(f"the {type(self).__name__} has no pipeline parallelism")

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


_BACKENDS: dict[str, Callable[..., TrainingBackend]] = {}


def register_backend(name: str) -> Callable[[type[TrainingBackend]], type[TrainingBackend]]:
    def register(cls: type[TrainingBackend]) -> type[TrainingBackend]:
        _BACKENDS[name] = cls
        return cls
    return register


def create_backend(name: str, settings: BackendSettings, dims: ParallelDims, device: torch.device,
                   build_model: ModelFactory) -> TrainingBackend:
    # Importing registers the implementations; deepspeed is imported only when asked for.
    if name == "deepspeed":
        from . import deepspeed_backend  # noqa: F401
    from . import native_backend  # noqa: F401

    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name](settings, dims, device, build_model)
