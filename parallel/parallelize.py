"""`parallelize()`: every parallel technique applied to a model, in one fixed order.

The order (docs/design.md) is: sequence-parallel attention → pipeline split → tensor parallelism →
recomputation / offload (or sequence-chunked layers) → data-parallel wrapping (FSDP2 or DDP; DeepSpeed wraps
in its own engine).
Each step lives in its own module, reads the `Layout` (layout.py) and does nothing when the layout leaves
it off. Sequence parallelism switches the whole model's attention (its stages share it); the pipeline
split turns the model into this rank's stages (pipeline.py); every later step applies to each of them, so
`parallelize()` returns the rank's model parts: the whole model, or its pipeline stages.

With tensor or pipeline parallelism the data-parallel step reduces gradients over the dp × sp
sub-mesh only: the other ranks hold other shards or other stages. Under tensor parallelism it is FSDP2
(`fully_shard`) or FSDP2's replicate mode (DDP semantics; `DistributedDataParallel` itself refuses
DTensor parameters); pipeline stages of plain tensors use FSDP2 or DDP over that sub-mesh.

FSDP2 shards a model built on the meta device: the weights are materialized on each rank's device
after sharding and filled from rank 0's full copy (`materialize_sharded`), so no rank but the
first ever holds the full weights. (Under pipeline parallelism every rank builds the full model once
and keeps its stages: the stages on other ranks hold other keys, which rank 0's broadcast cannot fill.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .dims import ParallelDims, build_mesh, group_timeout
from .layout import Layout
from .pipeline import apply_stage_boundaries, split_stages
from .recompute import apply_recompute
from .sequence_chunks import apply_sequence_chunks
from .sp_attention import apply_sequence_parallel
from .tensor_parallel import apply_tensor_parallel
from .tiling import apply_tiled_loss, apply_tiled_mlp


def decoder_layers(model: nn.Module) -> nn.Module:
    """The transformer blocks of an HF causal LM (`model.model.layers` in every supported family), or of
    a pipeline stage (a ModuleDict keyed by the layers' indices in the whole model); iterate over
    `.children()`."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: not a supported decoder family")
    return layers


def apply_fsdp(model: nn.Module, *, bf16: bool, offload: bool, mesh=None) -> nn.Module:
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, lm_head).

    `mesh`: the data-parallel (dp × sp) sub-mesh under tensor parallelism; None: every rank.
    """
    kwargs: dict = {"mesh": mesh} if mesh is not None else {}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        # Pinned host memory needs an accelerator; on a CPU-only machine the policy runs unpinned.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in decoder_layers(model).children():
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def materialize_sharded(model: nn.Module, full_model: nn.Module | None, device: torch.device, *,
                        offload: bool = False) -> None:
    """Give a meta-built, sharded model real storage and rank 0's weights and buffers.

    `full_model` is the fully initialized model on rank 0 and None elsewhere. With CPU offload the
    parameter shards live in host memory (FSDP2 moves them per use) while buffers go to `device`.
    Non-persistent buffers (RoPE `inv_freq`) are not in the state dict, so they are broadcast.
    """
    model.to_empty(device=torch.device("cpu") if offload else device)
    rank = dist.get_rank()
    full_sd = full_model.state_dict() if rank == 0 else {}
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True,
                                                                   broadcast_from_rank0=True))
    # Wrappers (activation checkpointing) add a prefix to module names; the source model has none.
    source_buffers = dict(full_model.named_buffers()) if rank == 0 else {}
    unwrap = "_checkpoint_wrapped_module."
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None:
                continue
            buf = buf.to(device)
            full_name = (f"{module_name}.{name}" if module_name else name).replace(unwrap, "")
            if rank == 0:
                buf.copy_(source_buffers[full_name])
            dist.broadcast(buf, src=0)
            module._buffers[name] = buf


def apply_replicate(model: nn.Module, mesh) -> nn.Module:
    """DDP semantics for DTensor parameters: FSDP2's replicate mode over `mesh` (dp × sp), per decoder
    layer and the root, so each layer's gradients are all-reduced as soon as its backward is done."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    for layer in decoder_layers(model).children():
        replicate(layer, mesh=mesh)
    replicate(model, mesh=mesh)
    return model


def parallelize(model: nn.Module, dims: ParallelDims, layout: Layout, *, data_parallel: str,
                device: torch.device | None = None) -> list[nn.Module]:
    """Apply the layout's techniques in the documented order; `data_parallel` is ddp | fsdp | none (DeepSpeed
    wraps in its own engine).

    Returns this rank's model parts: `[model]`, or under pipeline parallelism its stages.
    """
    mesh = dp_mesh = None
    if dims.tp > 1 or dims.pp > 1 or dims.sp > 1:
        device_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        mesh = build_mesh(dims, device_type)
        if data_parallel != "none" and (dims.tp > 1 or dims.pp > 1):
            dp_mesh = mesh["dp", "sp_ring", "sp_ulysses"]._flatten("dp_sp")
            dp_mesh.get_group().set_timeout(group_timeout(None, device_type))  # the run's collective timeout
    # 1. sequence-parallel attention: the model's attention runs on its shard through the ring / Ulysses
    #    kernels (sp_attention.py; each forward receives its shard's SequenceParallelContext), and a
    #    length-dependent rope learns the whole sequence's length (sp_rope.py). A switch of the whole model,
    #    which its pipeline stages share.
    if layout.sharded_attention:
        groups = {name: mesh.get_group(name) for name in ("sp_ring", "sp_ulysses")} if dims.sp > 1 else {}
        apply_sequence_parallel(model, groups)
    # 2. pipeline split: this rank's stages, each holding the original submodules of its slice
    #    (pipeline.py). Their activations cross stages in the dtype FSDP2's mixed precision computes in.
    parts = [model]
    if dims.pp > 1:
        boundary = torch.bfloat16 if layout.bf16 and data_parallel == "fsdp" else torch.float32
        parts = split_stages(model, dims.pp, mesh.get_local_rank("pp"), layout.pp_stages_per_rank, boundary)
    return [_parallelize_part(part, dims, layout, mesh, dp_mesh, data_parallel=data_parallel, device=device)
            for part in parts]


def _parallelize_part(model: nn.Module, dims: ParallelDims, layout: Layout, mesh, dp_mesh, *, data_parallel: str,
                      device: torch.device | None) -> nn.Module:
    """Steps 3-5 on the whole model or on one pipeline stage."""
    # 3. tensor parallel: the decoder layers' linears (and, with tp_sequence_parallel, the norms between
    #    them) become DTensors over the tp dimension (tensor_parallel.py).
    if dims.tp > 1:
        apply_tensor_parallel(model, decoder_layers(model), mesh["tp"], sequence_parallel=layout.tp_sequence_parallel)
        if dims.pp > 1 and layout.tp_sequence_parallel:
            apply_stage_boundaries(model, mesh["tp"])  # stages exchange the local sequence shards
    # 4. recomputation / offload: tiled MLP and tiled logits + loss (tiling.py) first, then wrap decoder
    #    layers (or their sub-modules) in non-reentrant checkpointing, optionally with their inputs in
    #    host memory; before FSDP so that each FSDP unit is a checkpointed layer (torchtitan's order).
    apply_tiled_mlp(decoder_layers(model), layout.tiled_mlp_chunk)
    if getattr(model, "lm_head", None) is not None:  # pipeline stages but the last have none
        apply_tiled_loss(model, layout.tiled_loss_chunk, defer_norm=dims.tp == 1)
    if layout.sequence_chunks > 1:  # each layer chunk by chunk, recomputed in backward (its own checkpoint)
        apply_sequence_chunks(decoder_layers(model), layout.sequence_chunks, layout.disk_dir,
                              layout.offload_checkpoints)
    else:
        apply_recompute(decoder_layers(model), layout)
    # 5. data-parallel wrapping.
    if data_parallel == "fsdp":
        return apply_fsdp(model, bf16=layout.bf16, offload=layout.offload_params or layout.offload_optimizer,
                          mesh=dp_mesh)
    if data_parallel == "ddp" and dims.tp > 1:
        # TP ranks hold different shards: reduce over dp × sp only (also when that is one rank: the
        # wrapper turns the partial gradients of the tp-replicated norm weights into full ones).
        return apply_replicate(model, dp_mesh)
    # Gradients are reduced over dp × sp: sequence-parallel ranks hold partial gradients of one replica.
    if data_parallel == "ddp" and dims.dp * dims.sp > 1:
        device_ids = [device.index] if device is not None and device.type == "cuda" else None
        group = dp_mesh.get_group() if dp_mesh is not None else None  # pipeline: this stage's replicas
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets. Without it each
        # gradient also exists as its own tensor: all of them at the optimizer step, the top layers' (lm_head
        # first) while the activations peak (docs/memory.md).
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group,
                                       gradient_as_bucket_view=True)
    return model
