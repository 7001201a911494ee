"""The recipe against its model: the layout rules that need the model's config (heads, layers, head_dim) and
the extended length, applied in one function by the workers (`setup_run`) and by the launcher before any worker
starts (`preflight_model`). Imports only what reading a config needs: the launcher pays for nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from longtune.parallel.dims import ParallelDims
from longtune.parallel.kernels import kernel_problem
from longtune.parallel.layout_rules import (
    attention_heads,
    pipeline_problem,
    pose_problem,
    tensor_parallel_problem,
    ulysses_heads_problem,
)

from .extension import apply_extension, plan_extension
from .model import ModelSource, build_config, check_model_files, resolve_model_source
from .recipe import Recipe, RecipeError

PREFLIGHT_VOCAB = 32000
"""Vocabulary size of a tiny flavour's config in `preflight_model` (the real one is the tokenizer's; no layout
rule reads it; a model dir's config keeps its own)."""


def extended_config(recipe: Recipe, source: ModelSource, vocab_size: int):
    """(HF config with the recipe's overrides and extension applied, the extension plan or None)."""
    config = build_config(source, vocab_size, recipe.model.config_overrides, recipe.model.trust_remote_code)
    ext, plan = recipe.extension, None
    if ext.enabled:
        plan = plan_extension(config, ext.method, ext.target_length, ext.original_length, ext.factor,
                              ext.rope_theta, ext.options)
        apply_extension(config, plan)
    return config, plan


def recipe_dims(recipe: Recipe, world: int) -> ParallelDims:
    """The recipe's degrees on `world` processes (`Recipe.data_parallel_size` refuses a world that does not fit)."""
    par = recipe.parallel
    return ParallelDims(world, dp=recipe.data_parallel_size(world), pp=par.pp, sp_ring=par.sp.ring,
                        sp_ulysses=par.sp.ulysses, tp=par.tp)


def check_against_model(recipe: Recipe, config, plan, dims: ParallelDims, device_type: str) -> None:
    """Raises RecipeError with the first of `layout_problems`: the message names the numbers."""
    problem = next((found for found in layout_problems(recipe, config, plan, dims, device_type) if found), None)
    if problem:
        raise RecipeError(problem)


def layout_problems(recipe: Recipe, config, plan, dims: ParallelDims, device_type: str) -> Iterator[str | None]:
    """Every rule of `parallel.layout_rules` that applies to this run, in order, each asked only once the ones
    before it passed (a rule may assume them): PoSE vs the extended length, tp / Ulysses vs the (KV) heads, pp vs
    the layers and the step's micro-batches, the block attention kernel vs the device, dtype and head_dim."""
    tr, par = recipe.train, recipe.parallel
    pose = recipe.extension.pose.chunks > 0
    if pose:
        yield pose_problem(tr.seq_len, plan.target_length, dims.pp)
    yield tensor_parallel_problem(config, dims.tp)
    yield ulysses_heads_problem(*attention_heads(config), dims.sp_ulysses, dims.tp)
    grad_accum = tr.global_batch_size // (dims.dp * tr.micro_batch_size)
    yield pipeline_problem(config, dims.pp, par.stages_per_rank, par.pp_schedule, grad_accum)
    # A named kernel is checked even where attention does not go through the ring (sp = 1, no PoSE): a kernel
    # the recipe names but this machine cannot run is one error here, not a silent no-op.
    yield kernel_problem(par.sp.kernel, device_type, recipe.model.dtype, _head_dim(config))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def preflight_model(recipe: Recipe, world: int) -> None:
    """Before any worker starts: the model dir is readable (config.json, weights, safetensors headers) and the
    recipe's layout on `world` processes fits the model, by the rules the workers apply (`check_against_model`).
    A progressive run is checked with its first stage (the one that trains this model)."""
    if recipe.stages:
        recipe = recipe.stage_recipe(0)
    source = resolve_model_source(recipe.model.name_or_path)
    check_model_files(source)
    dims = recipe_dims(recipe, world)
    config, plan = extended_config(recipe, source, PREFLIGHT_VOCAB)
    check_against_model(recipe, config, plan, dims, "cuda" if torch.cuda.is_available() else "cpu")
