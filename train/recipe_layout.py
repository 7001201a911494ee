"""A recipe's model shape and parallel layout, and the inverse: a recipe for a layout.

`layout_from_recipe` is the one translation of the recipe's parallel / memory / train keys into a
`longtune.parallel.layout.Layout`; `recipe_for_layout` turns a planned layout back into a recipe
(`longtune plan --write-recipe`). Model shapes come from built-in config numbers, the tiny flavours, a
shipped model or an HF dir's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longtune.data_prep.user_error import UserError
from longtune.parallel.layout import Layout
from longtune.parallel.memory_model import ModelShape


class ModelShapeError(UserError, ValueError):
    """A model name or config the shape cannot be read from."""


BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, hf_id="meta-llama/Meta-Llama-3-8B"),
    "llama-3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=128256, hf_id="meta-llama/Meta-Llama-3-70B"),
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, hf_id="meta-llama/Llama-2-7b-hf"),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000, hf_id="mistralai/Mistral-7B-v0.1"),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, hf_id="Qwen/Qwen2.5-7B"),
}
"""Config numbers of well-known models (from their published config.json files)."""
BUILTIN_MODELS["llama-3.1-8b"] = {**BUILTIN_MODELS["llama-3-8b"], "hf_id": "meta-llama/Llama-3.1-8B"}  # same shapes


def _tiny_vocab() -> int:
    """The tiny flavours' vocabulary: the embedded tokenizer's, which its BPE trainer fills exactly
    (special tokens included), so it need not be trained here."""
    from .tokenizer import EMBEDDED_VOCAB_SIZE

    return EMBEDDED_VOCAB_SIZE


def resolve_shape(name: str, overrides: dict[str, Any] | None = None) -> ModelShape:
    """A model's shape from a built-in name, a tiny flavour, a shipped model or an HF dir's config.json."""
    from .model import TINY_FLAVOURS, ModelSourceError, resolve_model_source

    if name.lower() in BUILTIN_MODELS:
        config = dict(BUILTIN_MODELS[name.lower()])
    elif name in TINY_FLAVOURS:
        config = dict(TINY_FLAVOURS[name], vocab_size=_tiny_vocab())
    else:
        try:
            source = resolve_model_source(name)
        except ModelSourceError as exc:
            raise ModelShapeError(f"{exc}; built-in configs: {', '.join(BUILTIN_MODELS)}") from None
        config = json.loads((Path(source.name_or_path) / "config.json").read_text())
    config.update(overrides or {})
    try:
        return ModelShape.from_hf_config(config, name=name)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelShapeError(f"model {name!r}: config lacks the numbers the planner needs ({exc})") from None


def shape_for_recipe(recipe) -> ModelShape:
    """The shape of a recipe's model, with its `model.config_overrides`."""
    return resolve_shape(recipe.model.name_or_path, recipe.model.config_overrides)


def layout_from_recipe(recipe, world: int) -> Layout:
    """The layout of a recipe run on `world` processes: what the backends, `parallelize()`, the memory and
    time models and the planner read."""
    par, mem, tr = recipe.parallel, recipe.memory, recipe.train
    dp = recipe.data_parallel_size(world)
    if par.backend == "deepspeed":
        sharding = f"zero{par.deepspeed.zero_stage}" if par.deepspeed.zero_stage else "ddp"
    else:
        sharding = "fsdp" if par.fsdp else "ddp"
    # One process with sdpa and packed documents: transformers builds an L × L mask (memory_model.Attention).
    masked = (par.sp.degree == 1 and recipe.model.attn_implementation == "sdpa" and recipe.data.document_masking
              and not recipe.extension.pose.chunks)
    return Layout(dp=dp, sp_ulysses=par.sp.ulysses, sp_ring=par.sp.ring, tp=par.tp, pp=par.pp, sharding=sharding,
                  recompute=mem.recompute, recompute_every=mem.recompute_every,
                  recompute_modules=tuple(mem.recompute_modules), offload_checkpoints=mem.offload.checkpoints,
                  offload_activations=mem.offload.activations, offload_optimizer=mem.offload.optimizer,
                  offload_params=mem.offload.params, optimizer_swap=mem.offload.optimizer_swap,
                  offload_gradients=mem.offload.gradients, offload_tier=mem.offload.tier,
                  tiled_loss_chunk=mem.tiled_loss_chunk if mem.tiled_loss else 0,
                  tiled_mlp_chunk=mem.tiled_mlp_chunk if mem.tiled_mlp else 0,
                  sequence_chunks=mem.sequence_chunks, micro_batch=tr.micro_batch_size,
                  grad_accum=tr.global_batch_size // (dp * tr.micro_batch_size), dtype=recipe.model.dtype,
                  attention="sdpa_masked" if masked else "flash", sp_layout=par.sp.layout,
                  tp_sequence_parallel=par.tp_sequence_parallel, pp_schedule=par.pp_schedule,
                  pp_stages_per_rank=par.stages_per_rank,
                  offload_dir=(mem.offload.dir or str(Path(tr.output_dir) / "offload"))
                  if mem.offload.tier == "disk" else None, pose=bool(recipe.extension.pose.chunks))


def recipe_for_layout(layout: Layout, model: str, seq_len: int, output_dir: str = "runs/planned"):
    """A recipe (validated by the recipe loader) that trains `model` at `seq_len` with `layout`."""
    from .recipe import recipe_from_dict

    zero = layout.sharding.startswith("zero")
    name = BUILTIN_MODELS.get(model.lower(), {}).get("hf_id", model)
    data = {
        "model": {"name_or_path": name, "dtype": layout.dtype},
        "parallel": {"backend": "deepspeed" if zero else "native", "dp": layout.dp,
                     "fsdp": layout.sharding == "fsdp", "tp": layout.tp, "pp": layout.pp,
                     "sp": {"ulysses": layout.sp_ulysses, "ring": layout.sp_ring,
                            "ring_impl": "ring" if layout.sp_layout == "contiguous" else "zigzag"}},
        "memory": {"recompute": layout.recompute, "tiled_loss": bool(layout.tiled_loss_chunk),
                   "tiled_mlp": bool(layout.tiled_mlp_chunk),
                   "offload": {"checkpoints": layout.offload_checkpoints, "activations": layout.offload_activations,
                               "optimizer": layout.offload_optimizer, "params": layout.offload_params,
                               "optimizer_swap": layout.optimizer_swap, "gradients": layout.offload_gradients,
                               "tier": layout.offload_tier}},
        "train": {"seq_len": seq_len, "micro_batch_size": layout.micro_batch,
                  "global_batch_size": layout.dp * layout.micro_batch * layout.grad_accum, "output_dir": output_dir},
    }
    if zero:
        data["parallel"]["deepspeed"] = {"zero_stage": int(layout.sharding[-1])}
        del data["parallel"]["fsdp"]
    if layout.sp == 1 and layout.attention == "flash":
        # One process per sequence: an O(L) kernel that follows packed documents (needs flash-attn); sdpa would
        # build an L × L mask (memory_model.Attention).
        data["model"]["attn_implementation"] = "flash_attention_2"
    if layout.tiled_loss_chunk:
        data["memory"]["tiled_loss_chunk"] = layout.tiled_loss_chunk
    if layout.tiled_mlp_chunk:
        data["memory"]["tiled_mlp_chunk"] = layout.tiled_mlp_chunk
    if layout.sequence_chunks > 1:
        data["memory"]["sequence_chunks"] = layout.sequence_chunks
    if layout.recompute == "selective":
        data["memory"]["recompute_every"] = layout.recompute_every
        data["memory"]["recompute_modules"] = list(layout.recompute_modules)
    return recipe_from_dict(data, source="longtune plan")
