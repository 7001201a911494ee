"""The DeepSpeed backend: ZeRO 0-3 with optional optimizer / parameter offload through
`deepspeed.initialize`. The DeepSpeed config is generated from the recipe (one source of truth); a
user JSON may add fields, and its `"auto"` values are filled from the recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longtune.data_prep.user_error import UserError

from .backend import BackendSettings, ModelFactory, TrainingBackend
from .dims import ParallelDims
from .layout import Layout
from .safe_load import deepspeed_safe_globals, weights_only_loads


class DeepSpeedConfigError(UserError, ValueError):
    """A user DeepSpeed JSON that contradicts the recipe."""


def generate_deepspeed_config(settings: BackendSettings, layout: Layout, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config that the recipe implies. DeepSpeed treats every rank as data-parallel (the
    sequence-parallel ones reduce gradients like dp), so its batch bookkeeping counts dp × sp ranks."""
    zero: dict[str, Any] = {"stage": layout.zero_stage}
    if layout.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if layout.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    optimizer_params: dict[str, Any] = {
        "lr": settings.lr, "betas": list(settings.betas), "eps": settings.eps,
        "weight_decay": settings.weight_decay,
    }
    if not on_gpu and not layout.offload_optimizer:
        # On CPU, torch's AdamW (no JIT build); offload uses DeepSpeedCPUAdam regardless.
        optimizer_params["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.micro_batch * layout.grad_accum * layout.shard_group,
        "gradient_clipping": settings.grad_clip,
        "bf16": {"enabled": layout.bf16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def merge_user_config(generated: dict[str, Any], user: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Add the user's fields; "auto" takes the recipe's value; a conflicting value is an error."""
    merged = dict(generated)
    for key, value in user.items():
        name = f"{where}{key}"
        if value == "auto":
            if key not in generated:
                raise DeepSpeedConfigError(f"deepspeed config: {name} is \"auto\" but the recipe does "
                                           "not determine it")
            continue
        if key not in generated:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(generated[key], dict):
            merged[key] = merge_user_config(generated[key], value, f"{name}.")
        elif value != generated[key]:
            raise DeepSpeedConfigError(f"deepspeed config: {name} = {value!r} contradicts the recipe's "
                                       f"{generated[key]!r}; set it in the recipe or write \"auto\"")
    return merged


def load_deepspeed_config(settings: BackendSettings, layout: Layout, on_gpu: bool) -> dict[str, Any]:
    config = generate_deepspeed_config(settings, layout, on_gpu)
    if settings.deepspeed_config:
        try:
            user = json.loads(Path(settings.deepspeed_config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DeepSpeedConfigError(f"parallel.deepspeed.config {settings.deepspeed_config}: {exc}") from None
        config = merge_user_config(config, user)
    return config


def build_zero3_model(build_model: ModelFactory, config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The model with its parameters partitioned as they are created (ZeRO-3 `zero.Init`): only rank 0
    ever holds the full weights, on the host; the other ranks hold their partitions only.

    transformers builds under `zero.Init` while an `HfDeepSpeedConfig` is alive (the way it loads pretrained
    weights under ZeRO-3), but its initialization then differs from the seeded one of `build_model`. So rank 0
    also builds the full model, and the partitioned one is filled from it: the weights are those of a model
    built on one process.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init takes the world size from deepspeed.comm, which deepspeed.initialize would set up only later.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    full = build_model("cpu") if dist.get_rank() == 0 else None  # before the config below: unpartitioned
    zero3 = HfDeepSpeedConfig(config)  # transformers builds under zero.Init while this object is alive
    model = build_model(device)
    del zero3
    fill_from_rank0(model, full)
    return model


def fill_from_rank0(model: torch.nn.Module, full: torch.nn.Module | None) -> None:
    """Rank 0's weights (`full`; None on the other ranks) into a ZeRO-3-partitioned model of the same
    structure: each parameter is gathered, written by rank 0 and re-partitioned (in DeepSpeed's dtype, as
    `deepspeed.initialize` casts); the buffers, which DeepSpeed never partitions (RoPE `inv_freq`), are sent
    whole, dtype included."""
    import deepspeed

    rank0 = dist.get_rank() == 0
    full_params = dict(full.named_parameters(remove_duplicate=False)) if rank0 else {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank0:
                param.data.copy_(full_params[name])
    sent = [dict(full.named_buffers()) if rank0 else None]
    dist.broadcast_object_list(sent, src=0)
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = sent[0][f"{module_name}.{name}" if module_name else name].to(buf.device)


class DeepSpeedBackend(TrainingBackend):
    def __init__(self, settings: BackendSettings, layout: Layout, dims: ParallelDims, device: torch.device,
                 build_model: ModelFactory) -> None:
        super().__init__(settings, layout, dims, device)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed

        from .parallelize import parallelize

        self.config = load_deepspeed_config(settings, layout, device.type == "cuda")
        built = build_zero3_model(build_model, self.config, device) if layout.zero_stage == 3 else build_model(device)
        model, = parallelize(built, dims, layout, data_parallel="none", device=device)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, settings.lr_multiplier),
        )
        self._grad_norm = 0.0

    @property
    def loss_multiplier(self) -> float:
        # DeepSpeed divides the loss by the accumulation steps and averages gradients over all of its
        # ranks, which include the sequence-parallel ones.
        return float(self.dims.dp * self.dims.sp * self.layout.grad_accum)

    def train_mode(self) -> None:
        self.engine.train()

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.engine(**inputs, use_cache=False).logits

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self.engine.backward(loss)
        if last_micro_batch:
            # The norm is known only after DeepSpeed's reduction, inside step() at the boundary.
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            self._grad_norm = float(norm) if norm is not None else float("nan")
        else:
            self.engine.step()

    def step(self) -> float:
        return self._grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False)

    def load_checkpoint(self, path: Path) -> None:
        # DeepSpeed's checkpoint engine calls torch.load(weights_only=False): forced to weights_only here,
        # with the few DeepSpeed classes its ZeRO checkpoints hold allowed.
        with weights_only_loads(deepspeed_safe_globals(), what=str(path / "deepspeed")):
            load_path, _ = self.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        import deepspeed

        module = self.engine.module
        params = list(module.parameters()) if self.layout.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            rank0 = not dist.is_initialized() or dist.get_rank() == 0
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank0 else None
        return sd
