"""The native backend: one process, DDP or FSDP2, torch AdamW, checkpoints through torch DCP."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .backend import BackendSettings, ModelFactory, TrainingBackend, register_backend
from .dims import ParallelDims
from .parallelize import materialize_sharded, parallelize


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> float:
    """The global gradient norm (before clipping), then clip to `max_norm` (inf: no clipping).

    Gradients may be plain tensors or DTensors on several meshes — under TP the decoder layers live
    on the (dp × sp, tp) mesh and the embeddings on dp × sp — which torch's `clip_grad_norm_` cannot
    stack together: the norm is taken per mesh, made whole (`full_tensor`) and combined.
    """
    by_mesh: dict = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().cpu())
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if math.isfinite(max_norm):
        for group in by_mesh.values():  # torch's foreach ops take one mesh at a time
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns that it assumes one process when no process group exists; here that is the intent."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@register_backend("native")
class NativeBackend(TrainingBackend):
    def __init__(self, settings: BackendSettings, dims: ParallelDims, device: torch.device,
                 build_model: ModelFactory) -> None:
        super().__init__(settings, dims, device)
        shard = settings.fsdp
        if shard:
            # Build on meta, shard, then fill from rank 0's copy: only rank 0 ever holds it all.
            offload = settings.offload_params or settings.offload_optimizer
            self.model = build_model("meta")
            full = build_model("cpu") if dist.get_rank() == 0 else None
            parallelize(self.model, dims, data_parallel="fsdp", bf16=settings.bf16, offload=offload,
                        device=device, recompute=settings.recompute,
                        tp_sequence_parallel=settings.tp_sequence_parallel)
            materialize_sharded(self.model, full, device, offload=offload)
            del full
        else:
            self.model = parallelize(build_model(device), dims, data_parallel="ddp", device=device,
                                     recompute=settings.recompute,
                                     tp_sequence_parallel=settings.tp_sequence_parallel)
        self._autocast = settings.bf16 and not shard  # FSDP2 casts through its MixedPrecisionPolicy
        self._fsdp = isinstance(self.model, FSDPModule)  # FSDP2, or its replicate mode under TP
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps,
            weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, settings.lr_multiplier)

    @property
    def loss_multiplier(self) -> float:
        # DDP / FSDP2 average gradients over dp × sp (sequence-parallel ranks hold the same parameters
        # and partial gradients of the same rows). Tensor-parallel ranks compute one replica's loss
        # together: each holds it whole and its gradient is that of its own shard, no averaging.
        return float(self.dims.dp * self.dims.sp)

    def train_mode(self) -> None:
        self.model.train()

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self._autocast
               else contextlib.nullcontext())
        with ctx:
            return self.model(**inputs, use_cache=False).logits

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        if self._fsdp:
            self.model.set_requires_gradient_sync(last_micro_batch)
            loss.backward()
        elif isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last_micro_batch:
            with self.model.no_sync():
                loss.backward()
        else:
            loss.backward()

    def step(self) -> float:
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        norm = clip_grad_norm(list(self.model.parameters()), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        with _single_process_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "state"))
        if not dist.is_initialized() or dist.get_rank() == 0:
            sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
            (path / "scheduler.json").write_text(json.dumps(sched))

    def load_checkpoint(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_dcp():
            dcp.load(state, checkpoint_id=str(path / "state"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        sched = json.loads((path / "scheduler.json").read_text())
        self.scheduler.load_state_dict({**sched, "lr_lambdas": [None]})

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=True))
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return sd
