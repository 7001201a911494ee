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

from .backend import BackendSettings, ModelFactory, TrainingBackend
from .dims import ParallelDims, build_mesh
from .layout import Layout
from .micro_batch import MicroBatchInputs
from .offload import GradientOffload, OptimizerStateSwap, make_tier
from .parallelize import materialize_sharded, parallelize
from .pipeline import PipelineRunner, gather_stage_state_dicts
from .recompute import activation_offload
from .safe_load import safe_dcp_load
from .tiling import LossFn


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float,
                   pipeline_group: dist.ProcessGroup | None = None) -> float:
    """The global gradient norm (before clipping), then clip to `max_norm` (inf: no clipping).

    Gradients may be plain tensors or DTensors on several meshes — under TP the decoder layers live
    on the (dp × sp, tp) mesh and the embeddings on dp × sp — which torch's `clip_grad_norm_` cannot
    stack together: the norm is taken per mesh, made whole (`full_tensor`) and combined. Under pipeline
    parallelism each rank holds other stages' parameters: the squared norms are summed over
    `pipeline_group`.
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
    if pipeline_group is not None:
        squared = total.double().square()
        dist.all_reduce(squared, group=pipeline_group)
        total = squared.sqrt().float()
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


class NativeBackend(TrainingBackend):
    def __init__(self, settings: BackendSettings, layout: Layout, dims: ParallelDims, device: torch.device,
                 build_model: ModelFactory) -> None:
        super().__init__(settings, layout, dims, device)
        if layout.offload_gradients and dims.is_distributed:
            raise ValueError("memory.offload.gradients is for one process, which owns its whole gradients (DDP "
                             "keeps them in its all-reduce buckets, FSDP2 reduce-scatters them); this run has "
                             f"{dims.world_size} processes")
        shard = layout.sharding == "fsdp"
        offload = shard and (layout.offload_params or layout.offload_optimizer)
        if shard and dims.pp == 1:
            # Build on meta, shard, then fill from rank 0's copy: only rank 0 ever holds it all.
            model = build_model("meta")
            full = build_model("cpu") if dist.get_rank() == 0 else None
            self.parts = parallelize(model, dims, layout, data_parallel="fsdp", device=device)
            materialize_sharded(self.parts[0], full, device, offload=offload)
            del full
        else:
            # Pipeline stages hold different keys, which rank 0's broadcast cannot fill: every rank builds
            # the full model and keeps its stages (FSDP2 then shards them in place).
            model = build_model(torch.device("cpu") if offload else device)
            self.parts = parallelize(model, dims, layout, data_parallel="fsdp" if shard else "ddp", device=device)
            del model
        self._autocast = layout.bf16 and not shard  # FSDP2 casts through its MixedPrecisionPolicy
        self._fsdp = isinstance(self.parts[0], FSDPModule)  # FSDP2, or its replicate mode under TP
        # One optimizer and LR schedule per part (torchtitan's model parts): the state-dict helpers take
        # one module and its optimizer at a time.
        self.optimizers = [torch.optim.AdamW(part.parameters(), lr=settings.lr, betas=settings.betas,
                                             eps=settings.eps, weight_decay=settings.weight_decay)
                           for part in self.parts]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, settings.lr_multiplier)
                           for opt in self.optimizers]
        # Optimizer state swapping (offload.py): AdamW's moments live in the tier between steps.
        self._swaps = []
        if layout.optimizer_swap:
            rank = dist.get_rank() if dist.is_initialized() else 0
            tier = make_tier(layout.disk_dir, prefix=f"optimizer-rank{rank}-")
            self._swaps = [OptimizerStateSwap(opt, tier) for opt in self.optimizers]
        # Gradient offload (offload.py): each gradient in the tier from its accumulation to the step.
        self._grad_offload = None
        if layout.offload_gradients:
            self._grad_offload = GradientOffload(list(self.parts[0].parameters()),
                                                 make_tier(layout.disk_dir, prefix="gradients-"))
        self._pipeline_group = None
        self.pipeline: PipelineRunner | None = None
        if dims.pp > 1:
            mesh = build_mesh(dims, device.type)
            self._pipeline_group = mesh.get_group("pp")
            self._pp_rank = mesh.get_local_rank("pp")
            # The export gathers over the pipeline group of rank 0: the ranks whose other coordinates are 0.
            self._stage_leader = all(mesh.get_local_rank(name) == 0 for name in mesh.mesh_dim_names if name != "pp")
            self.pipeline = PipelineRunner(self.parts, schedule=layout.pp_schedule,
                                           micro_batches=layout.grad_accum, group=self._pipeline_group,
                                           device=device)

    @property
    def model(self) -> torch.nn.Module:
        """The whole model (without pipeline parallelism, the only part)."""
        if self.pipeline is not None:
            raise RuntimeError("under pipeline parallelism the model is split into stages: run_micro_batches "
                               "runs them")
        return self.parts[0]

    @property
    def loss_multiplier(self) -> float:
        # DDP / FSDP2 average gradients over dp × sp (sequence-parallel ranks hold the same parameters
        # and partial gradients of the same rows). Tensor-parallel ranks compute one replica's loss
        # together: each holds it whole and its gradient is that of its own shard, no averaging.
        return float(self.dims.dp * self.dims.sp)

    def train_mode(self) -> None:
        for part in self.parts:
            part.train()

    def _autocast_context(self) -> contextlib.AbstractContextManager:
        return (torch.autocast(self.device.type, dtype=torch.bfloat16) if self._autocast
                else contextlib.nullcontext())

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        with self._autocast_context():
            return self.model(**inputs, use_cache=False).logits

    def _forward_backward(self, micro: list[MicroBatchInputs], loss_fn: LossFn, scale: float) -> float:
        if self.pipeline is None:
            return super()._forward_backward(micro, loss_fn, scale)
        # The schedule runs forward and backward of every micro-batch through the stages.
        self._wait_optimizer_state_written()
        with self._autocast_context(), activation_offload(self.layout.offload_activations):
            return self.pipeline.step(micro, loss_fn, scale)

    def _wait_optimizer_state_written(self) -> None:
        """The swapped-out state's writes overlap forward; backward's peak must not hold it."""
        for swap in self._swaps:
            swap.wait_written()

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self._wait_optimizer_state_written()
        if self._fsdp:
            self.model.set_requires_gradient_sync(last_micro_batch)
            loss.backward()
        elif isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last_micro_batch:
            with self.model.no_sync():
                loss.backward()
        else:
            loss.backward()

    def step(self) -> float:
        for swap in self._swaps:  # its reads overlap the gradients' restore and clipping
            swap.prefetch()
        if self._grad_offload is not None:
            self._grad_offload.restore()
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        params = [p for part in self.parts for p in part.parameters()]
        norm = clip_grad_norm(params, max_norm, self._pipeline_group)
        with self._optimizer_state_resident():
            for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def _optimizer_state_resident(self):
        """With optimizer_swap, the state comes back for the duration and leaves again after it."""
        with contextlib.ExitStack() as stack:
            for swap in self._swaps:
                stack.enter_context(swap.resident())
            yield

    @property
    def lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def _state_dicts(self) -> list[tuple[dict, dict]]:
        """(model, optimizer) state dicts per part, with HF keys (flattened optimizer state: the parts'
        keys are disjoint, so their union is one checkpoint whatever the pipeline split)."""
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        return [get_state_dict(part, opt, options=options) for part, opt in zip(self.parts, self.optimizers,
                                                                                  strict=True)]

    @staticmethod
    def _union(per_part: list[tuple[dict, dict]]) -> dict:
        return {"model": {k: v for m, _ in per_part for k, v in m.items()},
                "optim": {k: v for _, o in per_part for k, v in o.items()}}

    def save_checkpoint(self, path: Path) -> None:
        with self._optimizer_state_resident():
            state = self._union(self._state_dicts())
            with _single_process_dcp():
                dcp.save(state, checkpoint_id=str(path / "state"))
            del state
        if not dist.is_initialized() or dist.get_rank() == 0:
            sched = {k: v for k, v in self.schedulers[0].state_dict().items() if k != "lr_lambdas"}
            (path / "scheduler.json").write_text(json.dumps(sched))

    def load_checkpoint(self, path: Path) -> None:
        with self._optimizer_state_resident():
            per_part = self._state_dicts()
            state = self._union(per_part)
            with _single_process_dcp():
                # The metadata pickle through an allow-list, the non-tensor values weights_only.
                safe_dcp_load(state, path / "state")
            options = StateDictOptions(flatten_optimizer_state_dict=True)
            for part, opt, (model_sd, optim_sd) in zip(self.parts, self.optimizers, per_part, strict=True):
                set_state_dict(part, opt, model_state_dict={k: state["model"][k] for k in model_sd},
                               optim_state_dict={k: state["optim"][k] for k in optim_sd}, options=options)
            del per_part, state
        sched = json.loads((path / "scheduler.json").read_text())
        for scheduler in self.schedulers:
            scheduler.load_state_dict({**sched, "lr_lambdas": [None]})

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.pipeline is None:
            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))
            if dist.is_initialized() and dist.get_rank() != 0:
                return None
            return sd
        # Each stage's full weights (gathered over its dp × sp replicas where FSDP2 shards them; torch's
        # cpu_offload would keep them on global rank 0 only), then the stages onto rank 0.
        options = StateDictOptions(full_state_dict=True)
        stage_sd = {k: v.cpu() for part in self.parts for k, v in get_model_state_dict(part, options=options).items()}
        if not self._stage_leader:
            return None
        return gather_stage_state_dicts(stage_sd, pp_rank=self._pp_rank, group=self._pipeline_group)
