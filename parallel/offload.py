"""Where offloaded tensors live, and optimizer state swapped out of the device between steps.

An offload *tier* stores a tensor and gives it back later on the device it came from:

- `HostTier`: host memory (pinned, with non-blocking copies, when the tensor is on a GPU). On a CPU run
  host memory is the process's memory, so this tier moves tensors without freeing any.
- `DiskTier`: one file per tensor under a directory (NVMe offload): the tensor leaves the device *and*
  the host. The file is written on `put` and deleted when the last reference to its handle goes; the
  directory is removed when the tier is closed or garbage-collected, or at exit.

Both overlap their I/O with compute (`offload_io.py`): `put` returns at once and a thread pool writes behind,
`prefetch(handle)` starts a read that `get` then takes, and at most a bounded number of bytes is in flight.

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

import abc
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

from .offload_io import DEFAULT_MAX_IN_FLIGHT, Entry, OverlappedIO, overlap_settings, read_in_order


class OffloadHandle:
    """What a tier's `put` returns: the tensor's shape, dtype and device, and its stored state. When the last
    reference goes, the storage goes (at once, or when a write or read still running on it ends)."""

    __slots__ = ("entry", "shape", "dtype", "device", "__weakref__")

    def __init__(self, io: OverlappedIO, entry: Entry, tensor: torch.Tensor) -> None:
        self.entry, self.shape, self.dtype, self.device = entry, tensor.shape, tensor.dtype, tensor.device
        weakref.finalize(self, io.discard, entry)


class _Tier(abc.ABC):
    """put / prefetch / get / flush / close over an `OverlappedIO`; a subclass says how a tensor is stored."""

    def __init__(self, io: OverlappedIO) -> None:
        self._io = io

    def put(self, tensor: torch.Tensor) -> OffloadHandle:
        """Returns at once with overlap (the tensor is written behind: do not modify it in place)."""
        tensor = tensor.detach()
        entry = self._new_entry(tensor)
        handle = OffloadHandle(self._io, entry, tensor)
        # On a GPU the copy to the host stays in the caller, on its stream: the pool writes CPU tensors only.
        self._io.put(entry, tensor.cpu())
        return handle

    def prefetch(self, handle: OffloadHandle) -> bool:
        """Start reading `handle` back in the background; False if not started (see offload_io)."""
        return self._io.prefetch(handle.entry)

    def get(self, handle: OffloadHandle) -> torch.Tensor:
        """The stored tensor on its device: the prefetched one, or read now."""
        tensor = self._io.get(handle.entry)
        return tensor.to(handle.device, non_blocking=tensor.is_pinned())

    def flush(self) -> None:
        """Wait until every tensor put so far is written."""
        self._io.flush()

    def close(self) -> None:
        """Wait for the writes and reads in flight and stop the tier's threads."""
        self._io.close()

    @abc.abstractmethod
    def _new_entry(self, tensor: torch.Tensor) -> Entry:
        """The stored tensor's state, with its place (a file path, a host copy) chosen by the tier."""


class HostTier(_Tier):
    """Host memory: a copy (on CPU too, so the same code path runs everywhere and the original is freed).

    A tensor on a GPU is copied into pinned memory with a non-blocking copy on the caller's stream (no thread
    involved); a CPU tensor is copied by the pool (write behind). Reading back needs no prefetch: `prefetch`
    starts nothing and `get` returns the host copy (non-blocking copy back on a GPU).
    """

    name = "host"

    def __init__(self, *, overlap: bool = True, max_bytes: int = DEFAULT_MAX_IN_FLIGHT, workers: int = 2) -> None:
        super().__init__(OverlappedIO(_copy_to_host, _host_copy, _forget_host_copy, overlap=overlap,
                                      max_bytes=max_bytes, workers=workers))

    def put(self, tensor: torch.Tensor) -> OffloadHandle:
        if tensor.device.type != "cuda":
            return super().put(tensor)
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        host.copy_(tensor.detach(), non_blocking=True)
        return OffloadHandle(self._io, Entry(host, _nbytes(tensor)), tensor)

    def prefetch(self, handle: OffloadHandle) -> bool:
        return False  # host memory is read in place

    def _new_entry(self, tensor: torch.Tensor) -> Entry:
        return Entry(None, _nbytes(tensor))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _copy_to_host(entry: Entry, tensor: torch.Tensor) -> None:
    entry.place = tensor.clone(memory_format=torch.contiguous_format)


def _host_copy(entry: Entry) -> torch.Tensor:
    return entry.place


def _forget_host_copy(entry: Entry) -> None:
    entry.place = None


def _remove(io: OverlappedIO, directory: Path) -> None:
    """After the writes in flight, this tier's directory, then its parent if no other process's tier is left
    in it."""
    io.shutdown()
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()


def _write_file(entry: Entry, tensor: torch.Tensor) -> None:
    raw = tensor.contiguous().reshape(-1).view(torch.uint8)  # any dtype, bf16 included
    raw.numpy().tofile(entry.place)


def _read_file(entry: Entry) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(entry.place, dtype=np.uint8))


def _unlink(entry: Entry) -> None:
    with contextlib.suppress(OSError):
        entry.place.unlink()


class DiskTier(_Tier):
    """One file per stored tensor in a fresh directory under `base` (created if missing); the pool writes
    behind and reads ahead (`prefetch`)."""

    name = "disk"

    def __init__(self, base: str | os.PathLike, prefix: str = "offload-", *, overlap: bool = True,
                 max_bytes: int = DEFAULT_MAX_IN_FLIGHT, workers: int = 2) -> None:
        Path(base).mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        self._counter = itertools.count()
        super().__init__(OverlappedIO(_write_file, _read_file, _unlink, overlap=overlap, max_bytes=max_bytes,
                                      workers=workers))
        self._finalizer = weakref.finalize(self, _remove, self._io, self.directory)

    def _new_entry(self, tensor: torch.Tensor) -> Entry:
        return Entry(self.directory / f"{next(self._counter)}.bin", _nbytes(tensor))

    def get(self, handle: OffloadHandle) -> torch.Tensor:
        raw = self._io.get(handle.entry)
        return raw.view(handle.dtype).reshape(handle.shape).to(handle.device)

    def close(self) -> None:
        """Wait for the writes and reads in flight, then remove the directory."""
        try:
            self._io.close()
        finally:
            self._finalizer()


OffloadTier = HostTier | DiskTier


def make_tier(directory: str | None, prefix: str = "offload-") -> OffloadTier:
    """`directory` None: host memory; else files in a fresh directory under it. Overlap and its bound from the
    environment (`offload_io.overlap_settings`)."""
    settings = overlap_settings()
    return HostTier(**settings) if directory is None else DiskTier(directory, prefix=prefix, **settings)


def read_all(tier: OffloadTier, handles: list[OffloadHandle]) -> Iterator[torch.Tensor]:
    """Each handle's tensor in order, the reads running ahead within the tier's bound (handles are dropped
    from the list as they are read)."""
    return read_in_order(tier.get, tier.prefetch, handles)


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

    Overlap: `swap_out()` writes behind (the state leaves as its writes end, during the next forward), and
    `wait_written()` waits for the rest, to be called before backward so that backward's peak never holds it.
    `prefetch()` starts reading the state back, to be called when the step begins (the gradients' restore and
    clipping overlap it; the state is resident at the step anyway); `swap_in()` takes what was read and
    reads the rest, running ahead within the tier's bound.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, tier: OffloadTier) -> None:
        self.optimizer, self.tier = optimizer, tier
        self.swapped_out = False

    def _swapped(self) -> list[tuple[dict, str, _Swapped]]:
        return [(state, key, value) for state in self.optimizer.state.values() for key, value in state.items()
                if isinstance(value, _Swapped)]

    def swap_out(self) -> None:
        if self.swapped_out:
            return
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key] = _Swapped(self.tier.put(value))
        self.swapped_out = True

    def wait_written(self) -> None:
        """Until the state swapped out is all in the tier (its tensors freed)."""
        if self.swapped_out:
            self.tier.flush()

    def prefetch(self) -> None:
        """Start reading the state back, as far as the tier's bound allows."""
        for _, _, swapped in self._swapped():
            if not self.tier.prefetch(swapped.handle):
                break

    def swap_in(self) -> None:
        if not self.swapped_out:
            return
        places = self._swapped()
        handles = [swapped.handle for _, _, swapped in places]
        for (state, key, swapped), tensor in zip(places, read_all(self.tier, handles), strict=True):
            del swapped.handle  # the handle list drops its reference once read: the file goes with this one
            state[key] = tensor
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

    A post-accumulate-grad hook per parameter stores `.grad` and clears it (the write goes behind: backward
    goes on). With several micro-batches the stored gradient comes back, the new one is added (old + new, the
    order autograd's own accumulation uses, so the sum is bit-identical) and the result is stored in its
    place. `restore()` reads in the order the gradients were stored, running ahead within the tier's bound.
    Only for a process that owns its whole gradients: under DDP they are views into its all-reduce buckets,
    under FSDP2 / ZeRO they are reduce-scattered as they come, and a pipeline stage's are accumulated by the
    schedule.
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
        params, handles = list(self._stored), list(self._stored.values())
        self._stored.clear()
        for param, grad in zip(params, read_all(self.tier, handles), strict=True):
            param.grad = grad

    def remove(self) -> None:
        """Detach the hooks (the stored gradients, if any, stay until `restore()`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
