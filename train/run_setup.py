"""Everything one rank needs before training (or a parity check) starts: the launched world, the
parallel dims and groups, tokenizer, HF config with the extension applied, the corpus and its seeded
order, a model factory, and the function that turns a micro-batch into this rank's model inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import torch

from longtune.parallel.dims import ParallelDims, build_mesh, device_for, init_process_group, launched_world
from longtune.parallel.micro_batch import MicroBatchInputs
from longtune.parallel.sharding import pad_to_multiple
from longtune.parallel.sp_input import shard_micro_batch

from .data import IGNORE_INDEX, MicroBatch, PoseSpec, StepBatches, load_corpus
from .model import ModelSource, build_model, resolve_model_source
from .model_checks import check_against_model, extended_config, recipe_dims
from .recipe import Recipe
from .tokenizer import load_run_tokenizer

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
    sp_groups: dict = field(default_factory=dict)

    def build_model(self, device: torch.device | str):
        """The model as the recipe describes it, on `device` (`parallelize()` then applies the layout)."""
        return build_model(self.source, self.config, device=device,
                           attn_implementation=self.recipe.model.attn_implementation,
                           seed=self.recipe.train.seed, trust_remote_code=self.recipe.model.trust_remote_code)

    def model_inputs(self, mb: MicroBatch) -> MicroBatchInputs:
        """This rank's part of `mb`: forward kwargs and shifted labels on the device, token counts."""
        sp = self.recipe.parallel.sp
        if self.dims.pp > 1:
            mb = self._pad_to_seq_len(mb)
        chunks = self.recipe.memory.sequence_chunks
        if self.dims.sp == 1 and self.batches.pose is None and chunks == 1:
            inputs = {"input_ids": mb.input_ids, "position_ids": mb.position_ids}
            labels, real = mb.labels, mb.real_tokens
        else:
            shard = shard_micro_batch(mb.input_ids, mb.labels, mb.position_ids, mb.real_mask, dims=self.dims,
                                      rank=self.rank, layout=sp.layout, pad_id=self.pad_id,
                                      groups=self.sp_groups, kernel=sp.kernel, chunks=chunks)
            inputs = {"input_ids": shard.input_ids, "position_ids": shard.position_ids,
                      "sp_context": shard.context}
            labels, real = shard.labels, shard.real_tokens
        moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return MicroBatchInputs(moved, labels.to(self.device), real, int((labels != IGNORE_INDEX).sum()))

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


def setup_run(recipe: Recipe) -> RunSetup:
    """Validate the world against the recipe, join the process group and build everything but the model."""
    rank, local_rank, world = launched_world()
    dims = recipe_dims(recipe, world)  # validates the world size before any heavy work
    if world > 1 or (recipe.parallel.backend == "native" and recipe.parallel.fsdp):
        init_process_group(recipe.train.collective_timeout_s)
    device = device_for(local_rank)
    tr = recipe.train
    torch.manual_seed(tr.seed)

    source = resolve_model_source(recipe.model.name_or_path)
    trust = recipe.model.trust_remote_code
    tokenizer = load_run_tokenizer(recipe.model.tokenizer, source.model_dir, trust)
    config, plan = extended_config(recipe, source, len(tokenizer))
    check_against_model(recipe, config, plan, dims, device.type)
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
                          micro_batch=tr.micro_batch_size, dp=dims.dp, dp_rank=dims.coordinate(rank, "dp"),
                          pad_id=pad_id, document_masking=recipe.data.document_masking, pose=pose)

    sp_groups: dict = {}
    if dims.sp > 1:  # the shards' batches name the groups their attention talks to
        mesh = build_mesh(dims, device.type)
        sp_groups = {"sp_ring": mesh.get_group("sp_ring"), "sp_ulysses": mesh.get_group("sp_ulysses")}
    return RunSetup(recipe, rank, world, dims, device, source, tokenizer, config, corpus, pad_id, batches,
                    sp_groups)
