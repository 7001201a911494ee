"""Where offloaded tensors live, and optimizer state swapped out of the device between steps.

An offload *tier* stores a tensor and gives it back later on the device it came from:

- `HostTier`: host memory (pinned, with non-blocking copies, when the tensor is on a GPU). On a CPU run
  host memory is the process's memory, so this tier moves tensors without freeing any.
- `DiskTier`: one file per tensor under a directory (NVMe offload): the tensor leaves the device *and*
  the host. The file is written on `put` and deleted when the last reference to its handle goes; the
  directory is removed when the tier is closed or garbage-collected, or at exit.

Checkpoint offload (`recompute.py`) stores the hidden states a checkpoint keeps in a tier. Optimizer
state swapping (`OptimizerStateSwap`) moves AdamW's moments to a tier after each step and back before the
next: during forward and backward, where long sequences put the activations' peak, the device holds
weights, gradients and activations but no optimizer state; at the step it holds weights, gradients and
the state but no activations. The peak is the larger of the two sums instead of their total.
Gradient offload (`GradientOffload`) does the same for the gradients within a step: each leaves the device
as soon as backward has accumulated it and returns for the step, so that backward holds the gradients of
the module it is in rather than of every module it has passed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


class HostTier:
    """Host memory: a copy (on CPU too, so the same code path runs everywhere and the original is freed)."""

    name = "host"

    def put(self, tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        pinned = tensor.device.type == "cuda"
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)
        return tensor.device, host

    def get(self, handle: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        device, host = handle
        return host.to(device, non_blocking=host.is_pinned())

    def close(self) -> None:
        pass


class _OnDisk:
    """A tensor written to a file; the file is deleted with the last reference to this handle."""

    __slots__ = ("path", "shape", "dtype", "device", "__weakref__")

    def __init__(self, path: Path, tensor: torch.Tensor) -> None:
        self.path, self.shape, self.dtype, self.device = path, tensor.shape, tensor.dtype, tensor.device
        weakref.finalize(self, _unlink, path)


def _remove(directory: Path) -> None:
    """This tier's directory, then its parent if no other process's tier is left in it."""
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class DiskTier:
    """One file per stored tensor in a fresh directory under `base` (created if missing)."""

    name = "disk"

    def __init__(self, base: str | os.PathLike, prefix: str = "offload-") -> None:
        Path(base).mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        self._counter = itertools.count()
        self._finalizer = weakref.finalize(self, _remove, self.directory)

    def put(self, tensor: torch.Tensor) -> _OnDisk:
        path = self.directory / f"{next(self._counter)}.bin"
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # any dtype, bf16 included
        raw.cpu().numpy().tofile(path)
        return _OnDisk(path, tensor)

    def get(self, handle: _OnDisk) -> torch.Tensor:
        raw = torch.from_numpy(np.fromfile(handle.path, dtype=np.uint8))
        tensor = raw.view(handle.dtype).reshape(handle.shape)
        return tensor.to(handle.device)

    def close(self) -> None:
        self._finalizer()


OffloadTier = HostTier | DiskTier


def make_tier(directory: str | None, prefix: str = "offload-") -> OffloadTier:
    """`directory` None: host memory; else files in a fresh directory under it."""
    return HostTier() if directory is None else DiskTier(directory, prefix=prefix)


class _Swapped:
    """Stands in for an optimizer state tensor while it is out of the device (any use of it fails)."""

    __slots__ = ("handle",)

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __repr__(self) -> str:
        return "<optimizer state swapped out: call swap_in() first>"


class OptimizerStateSwap:
    """Moves an optimizer's state tensors (not its scalar step counts) to a tier and back.

    `swap_out()` after the step, `swap_in()` before the next one, `resident()` around anything that reads
    or writes the state (checkpoints). Before the first step the state does not exist yet: both are no-ops.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, tier: OffloadTier) -> None:
        self.optimizer, self.tier = optimizer, tier
        self.swapped_out = False

    def swap_out(self) -> None:
        if self.swapped_out:
            return
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key] = _Swapped(self.tier.put(value))
        self.swapped_out = True

    def swap_in(self) -> None:
        if not self.swapped_out:
            return
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, _Swapped):
                    state[key] = self.tier.get(value.handle)
        self.swapped_out = False

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """The state on the device for the duration, then out again if it was out (or is new)."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()


class GradientOffload:
    """Each parameter's gradient goes to a tier as soon as backward has accumulated it; `restore()` brings
    them all back into `.grad` (before clipping and the optimizer step).

    A post-accumulate-grad hook per parameter stores `.grad` and clears it. With several micro-batches the
    stored gradient comes back, the new one is added (old + new, the order autograd's own accumulation
    uses, so the sum is bit-identical) and the result is stored in its place. Only for a process that owns
    its whole gradients: under DDP they are views into its all-reduce buckets, under FSDP2 / ZeRO they are
    reduce-scattered as they come, and a pipeline stage's are accumulated by the schedule.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], tier: OffloadTier) -> None:
        self.tier = tier
        self._stored: dict[torch.Tensor, Any] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._store) for p in parameters if p.requires_grad]

    def _store(self, param: torch.Tensor) -> None:
        grad, param.grad = param.grad, None
        previous = self._stored.pop(param, None)
        if previous is not None:
            grad = self.tier.get(previous) + grad
            del previous  # its file goes before the sum's is written
        self._stored[param] = self.tier.put(grad)

    @property
    def pending(self) -> int:
        """Gradients stored since the last `restore()`."""
        return len(self._stored)

    def restore(self) -> None:
        while self._stored:
            param, handle = self._stored.popitem()
            param.grad = self.tier.get(handle)
            del handle

    def remove(self) -> None:
        """Detach the hooks (the stored gradients, if any, stay until `restore()`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
