"""Parallel dimensions: the process group, the device, and a self-validating degree object."""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

MESH_ORDER = ("pp", "dp", "sp_ring", "sp_ulysses", "tp")
"""Outer → inner: the fastest links go to the chattiest dimension (docs/design.md)."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of one run; their product is the world size."""

    world_size: int
    dp: int = 1
    pp: int = 1
    sp_ring: int = 1
    sp_ulysses: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        degrees = {name: getattr(self, name) for name in MESH_ORDER}
        product = 1
        for value in degrees.values():
            product *= value
        if product != self.world_size:
            named = " × ".join(f"{k} {v}" for k, v in degrees.items())
            raise ValueError(f"{named} = {product} processes, but the world size is {self.world_size}")

    @property
    def sp(self) -> int:
        return self.sp_ring * self.sp_ulysses

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def coordinate(self, rank: int, name: str) -> int:
        """This rank's index along one mesh dimension (row-major in MESH_ORDER)."""
        inner = 1
        for dim in reversed(MESH_ORDER):
            if dim == name:
                return (rank // inner) % getattr(self, name)
            inner *= getattr(self, dim)
        raise ValueError(f"unknown mesh dimension {name!r}; valid: {', '.join(MESH_ORDER)}")


@functools.cache
def build_mesh(dims: ParallelDims, device_type: str):
    """The device mesh over every dimension in MESH_ORDER (size-1 dimensions included).

    One per (dims, device type) and process: the sequence-parallel groups of the run setup and the
    tensor-parallel and data-parallel sub-meshes of `parallelize()` come from the same mesh (FSDP2
    needs its mesh and the TP mesh to share a root) and its process groups are created once.

    The mesh's groups get the default group's collective timeout (`train.collective_timeout_s`):
    `init_device_mesh` creates them with torch's own default (30 minutes on gloo, 10 on NCCL) and takes
    no timeout, so it is set on each group before its first collective (as torchtitan does).
    """
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(getattr(dims, name) for name in MESH_ORDER)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_ORDER)
    timeout = group_timeout(None, device_type)
    for name in MESH_ORDER:
        mesh.get_group(name).set_timeout(timeout)
    return mesh


def group_timeout(group: dist.ProcessGroup | None, device_type: str) -> datetime.timedelta:
    """The collective timeout of `group` (None: the default group) for tensors on `device_type`."""
    group = group or dist.distributed_c10d._get_default_group()
    return group._get_backend(torch.device(device_type)).options._timeout


def launched_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (torchrun, accelerate, deepspeed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("LOCAL_PROCESS_RANK", "0")))
    return rank, local, world


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(timeout_s: float = 600.0) -> None:
    """gloo on CPU, NCCL for CUDA tensors (gloo kept for CPU-side collectives).

    Without a launcher this makes a one-process group (FSDP2 needs one even on a single device).
    """
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=dist.HashStore(), rank=0,
                                world_size=1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64, so token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()
