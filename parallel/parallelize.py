"""`parallelize()`: every parallel technique applied to a model, in one fixed order.

The order (DESIGN.md) is: pipeline split → tensor parallelism → sequence-parallel attention →
recomputation / offload → data-parallel wrapping (FSDP2 or DDP; DeepSpeed wraps in its own engine).
Each step lives in its own module and returns early when the recipe leaves it off; this version
applies tensor parallelism, sequence-parallel attention, recomputation and the data-parallel step —
pipeline parallelism arrives with its work item and the recipe refuses it until then
(`Recipe._cross_field_checks`).

With tensor parallelism the decoder layers hold DTensor shards over the `tp` mesh dimension, so the
data-parallel step reduces gradients over the dp × sp sub-mesh only, with FSDP2 (`fully_shard`) or
FSDP2's replicate mode (DDP semantics; `DistributedDataParallel` itself refuses DTensor parameters).

FSDP2 shards a model built on the meta device: the weights are materialized on each rank's device
after sharding and filled from rank 0's full copy (`materialize_sharded`), so no rank but the
first ever holds the full weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .dims import ParallelDims, build_mesh
from .recompute import RecomputeSettings, apply_recompute
from .tensor_parallel import apply_tensor_parallel
from .tiling import apply_tiled_loss, apply_tiled_mlp


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an HF causal LM (`model.model.layers` in every supported family)."""
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
    for layer in decoder_layers(model):
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

    for layer in decoder_layers(model):
        replicate(layer, mesh=mesh)
    replicate(model, mesh=mesh)
    return model


def parallelize(model: nn.Module, dims: ParallelDims, *, data_parallel: str, bf16: bool = False,
                offload: bool = False, device: torch.device | None = None,
                recompute: RecomputeSettings | None = None, tp_sequence_parallel: bool = True) -> nn.Module:
    """Apply the recipe's techniques in the documented order; `data_parallel` is ddp | fsdp | none."""
    # 1. pipeline split: not yet.
    # 2. tensor parallel: the decoder layers' linears (and, with tp_sequence_parallel, the norms between
    #    them) become DTensors over the tp dimension (tensor_parallel.py).
    mesh = None
    if dims.tp > 1:
        device_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        mesh = build_mesh(dims, device_type)
        apply_tensor_parallel(model, decoder_layers(model), mesh["tp"], sequence_parallel=tp_sequence_parallel)
    # 3. sequence-parallel attention: the model was built with attn_implementation="longtune_sp"
    #    (sp_attention.py) and each forward receives its shard's SequenceParallelContext.
    # 4. recomputation / offload: tiled MLP and tiled logits + loss (tiling.py) first, then wrap decoder
    #    layers (or their sub-modules) in non-reentrant checkpointing, optionally with their inputs in
    #    host memory; before FSDP so that each FSDP unit is a checkpointed layer (torchtitan's order).
    if recompute is not None:
        apply_tiled_mlp(decoder_layers(model), recompute.tiled_mlp_chunk)
        apply_tiled_loss(model, recompute.tiled_loss_chunk)
        apply_recompute(decoder_layers(model), recompute)
    # 5. data-parallel wrapping.
    if mesh is not None and data_parallel != "none":
        # TP ranks hold different shards: reduce over dp × sp only (also when that is one rank: the
        # wrapper turns the partial gradients of the tp-replicated norm weights into full ones).
        dp_mesh = mesh["dp", "sp_ring", "sp_ulysses"]._flatten("dp_sp")
        if data_parallel == "fsdp":
            return apply_fsdp(model, bf16=bf16, offload=offload, mesh=dp_mesh)
        return apply_replicate(model, dp_mesh)
    if data_parallel == "fsdp":
        return apply_fsdp(model, bf16=bf16, offload=offload)
    # Gradients are reduced over dp × sp: sequence-parallel ranks hold partial gradients of one replica.
    if data_parallel == "ddp" and dims.dp * dims.sp > 1:
        device_ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    return model
