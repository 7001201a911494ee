"""Everything one rank needs before training (or a parity check) starts: the launched world, the
parallel dims and groups, tokenizer, HF config with the extension applied, the corpus and its seeded
order, a model factory, and the function that turns a micro-batch into this rank's model inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import torch

from longtune.parallel.dims import ParallelDims, build_mesh, device_for, init_process_group, launched_world
from longtune.parallel.pipeline import pipeline_problem
from longtune.parallel.sharding import pad_to_multiple
from longtune.parallel.sp_attention import ATTN_IMPLEMENTATION as SP_ATTENTION
from longtune.parallel.sp_input import shard_micro_batch
from longtune.parallel.sp_rope import apply_length_aware_rope
from longtune.parallel.tensor_parallel import tensor_parallel_problem
from longtune.parallel.ulysses import replicate_kv_heads

from .data import MicroBatch, PoseSpec, StepBatches, load_corpus
from .extension import apply_extension, plan_extension
from .model import ModelSource, build_config, build_model, check_model_files, resolve_model_source
from .recipe import Recipe, RecipeError
from .tokenizer import load_tokenizer

log = logging.getLogger("longtune")


@dataclass
class RunSetup:
    recipe: Recipe
    rank: int
    world: int
    dims: ParallelDims
    device: torch.device
    source: ModelSource
    tokenizer: object
    config: object
    corpus: datasets.Dataset
    pad_id: int
    batches: StepBatches
    attn_implementation: str
    sp_groups: dict = field(default_factory=dict)

    def build_model(self, device: torch.device | str, attn_implementation: str | None = None):
        attn = attn_implementation or self.attn_implementation
        model = build_model(self.source, self.config, device=device, attn_implementation=attn,
                            seed=self.recipe.train.seed, trust_remote_code=self.recipe.model.trust_remote_code)
        if attn == SP_ATTENTION:  # runs on shards: dynamic NTK / LongRoPE choose from the whole sequence
            apply_length_aware_rope(model, self.sp_groups)
        return model

    def model_inputs(self, mb: MicroBatch) -> tuple[dict, torch.Tensor, int]:
        """(forward kwargs on the device, shifted labels, real tokens) of this rank's part of `mb`."""
        sp = self.recipe.parallel.sp
        if self.dims.pp > 1:
            mb = self._pad_to_seq_len(mb)
        if self.dims.sp == 1 and self.batches.pose is None:
            inputs = {"input_ids": mb.input_ids, "position_ids": mb.position_ids}
            labels, real = mb.labels, mb.real_tokens
        else:
            shard = shard_micro_batch(mb.input_ids, mb.labels, mb.position_ids, mb.real_mask, dims=self.dims,
                                      rank=self.rank, layout=sp.layout, pad_id=self.pad_id,
                                      groups=self.sp_groups, kernel=sp.kernel)
            inputs = {"input_ids": shard.input_ids, "position_ids": shard.position_ids,
                      "sp_context": shard.context}
            labels, real = shard.labels, shard.real_tokens
        moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return moved, labels.to(self.device), real

    def _pad_to_seq_len(self, mb: MicroBatch) -> MicroBatch:
        """Rows padded to `train.seq_len` (ignored labels, positions of their own document): pipeline
        stages exchange activations of one fixed shape for the whole run."""
        seq_len = self.recipe.train.seq_len
        width = mb.input_ids.shape[1]
        if width >= seq_len:
            return mb
        input_ids, labels, position_ids, extra = pad_to_multiple(mb.input_ids, mb.labels, mb.position_ids,
                                                                 seq_len, self.pad_id)
        real = torch.cat([mb.real_mask, torch.zeros(mb.real_mask.shape[0], extra, dtype=torch.bool)], dim=1)
        return MicroBatch(input_ids, labels, position_ids, real)


def extended_config(recipe: Recipe, source: ModelSource, vocab_size: int):
    """(HF config with the recipe's overrides and extension applied, the extension plan or None)."""
    config = build_config(source, vocab_size, recipe.model.config_overrides, recipe.model.trust_remote_code)
    ext, plan = recipe.extension, None
    if ext.method != "none":
        plan = plan_extension(config, ext.method, ext.target_length, ext.original_length, ext.factor,
                              ext.rope_theta, ext.options)
        apply_extension(config, plan)
    return config, plan


def check_model_layout(recipe: Recipe, config, plan, dims: ParallelDims) -> None:
    """The rules that need the model: PoSE vs the extended length, tp / Ulysses vs the (KV) heads, pp vs the
    layers and the step's micro-batches. Raises RecipeError naming the numbers. The workers run it in
    `setup_run`, the launching process before any worker starts (`preflight_model`)."""
    tr, par, sp = recipe.train, recipe.parallel, recipe.parallel.sp
    if recipe.extension.pose.chunks:
        if tr.seq_len >= plan.target_length:
            raise RecipeError(f"extension.pose: train.seq_len {tr.seq_len} already covers the target length "
                              f"{plan.target_length}; PoSE is for rows shorter than the target")
        if dims.pp > 1:
            raise RecipeError("extension.pose with parallel.pp > 1: not available yet in this version of longtune")
    tp_problem = tensor_parallel_problem(config, dims.tp)
    if tp_problem:
        raise RecipeError(tp_problem)
    heads = config.num_attention_heads
    if sp.ulysses > 1 and heads % (sp.ulysses * dims.tp):
        # Ulysses splits the heads that tensor parallelism leaves on each rank.
        tp_text = f" / parallel.tp {dims.tp} (= {heads // dims.tp})" if dims.tp > 1 else ""
        raise RecipeError(f"parallel.sp.ulysses {sp.ulysses} does not divide the model's "
                          f"{heads} query heads{tp_text}")
    if sp.ulysses > 1:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        try:  # what the sequence-parallel attention does with each rank's heads
            replicate_kv_heads(kv_heads // dims.tp, heads // dims.tp, sp.ulysses)
        except ValueError as exc:
            raise RecipeError(f"parallel.sp.ulysses {sp.ulysses}: {exc} (parallel.sp.ring splits the sequence, "
                              "not the heads)") from None
    grad_accum = tr.global_batch_size // (dims.dp * tr.micro_batch_size)
    pp_problem = pipeline_problem(config, dims.pp, par.stages_per_rank, par.pp_schedule, grad_accum)
    if pp_problem:
        raise RecipeError(pp_problem)


def preflight_model(recipe: Recipe, world: int) -> None:
    """Before any worker starts: the model dir is readable (config.json, weights, safetensors headers) and the
    recipe's layout on `world` processes fits the model, by the rules the workers apply (`check_model_layout`).
    A progressive run is checked with its first stage (the one that trains this model)."""
    if recipe.stages:
        recipe = recipe.stage_recipe(0)
    source = resolve_model_source(recipe.model.name_or_path)
    check_model_files(source)
    dp = recipe.data_parallel_size(world)
    sp = recipe.parallel.sp
    dims = ParallelDims(world, dp=dp, pp=recipe.parallel.pp, sp_ring=sp.ring, sp_ulysses=sp.ulysses,
                        tp=recipe.parallel.tp)
    config, plan = extended_config(recipe, source, PREFLIGHT_VOCAB)
    check_model_layout(recipe, config, plan, dims)


PREFLIGHT_VOCAB = 32000
"""Vocabulary size of a tiny flavour's config in `preflight_model` (the real one is the tokenizer's; no layout
rule reads it; a model dir's config keeps its own)."""


def setup_run(recipe: Recipe) -> RunSetup:
    """Validate the world against the recipe, join the process group and build everything but the model."""
    rank, local_rank, world = launched_world()
    dp = recipe.data_parallel_size(world)  # validates the world size before any heavy work
    if world > 1 or (recipe.parallel.backend == "native" and recipe.parallel.fsdp):
        init_process_group(recipe.train.collective_timeout_s)
    sp = recipe.parallel.sp
    dims = ParallelDims(world, dp=dp, pp=recipe.parallel.pp, sp_ring=sp.ring, sp_ulysses=sp.ulysses,
                        tp=recipe.parallel.tp)
    device = device_for(local_rank)
    tr = recipe.train
    torch.manual_seed(tr.seed)

    source = resolve_model_source(recipe.model.name_or_path)
    trust = recipe.model.trust_remote_code
    tokenizer = load_tokenizer(recipe.model.tokenizer, source.model_dir, trust)
    config, plan = extended_config(recipe, source, len(tokenizer))
    check_model_layout(recipe, config, plan, dims)
    pose = None
    if recipe.extension.pose.chunks:
        pose = PoseSpec(recipe.extension.pose.chunks, plan.target_length, tr.seed)
        log.info("PoSE: rows of %d tokens, %d chunks per document, position ids below %d", tr.seq_len,
                 pose.chunks, pose.target_length)
    if tr.seq_len > config.max_position_embeddings:
        log.warning("train.seq_len %d exceeds max_position_embeddings %d: direct extrapolation",
                    tr.seq_len, config.max_position_embeddings)

    corpus = load_corpus(recipe.data.path, tokenizer, tr.seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = StepBatches(corpus, seed=tr.seed, global_batch=tr.global_batch_size,
                          micro_batch=tr.micro_batch_size, dp=dp, dp_rank=dims.coordinate(rank, "dp"),
                          pad_id=pad_id, document_masking=recipe.data.document_masking, pose=pose)

    attn = recipe.model.attn_implementation
    sp_groups: dict = {}
    if dims.sp > 1 or pose is not None:
        # The model's own code runs on its shard; attention goes through the ring. PoSE uses this path on one
        # process too: transformers (sdpa, eager) would read its position skips as document starts.
        attn = SP_ATTENTION
    if dims.sp > 1:
        mesh = build_mesh(dims, device.type)
        sp_groups = {"sp_ring": mesh.get_group("sp_ring"), "sp_ulysses": mesh.get_group("sp_ulysses")}
    return RunSetup(recipe, rank, world, dims, device, source, tokenizer, config, corpus, pad_id, batches,
                    attn, sp_groups)
