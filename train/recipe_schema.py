"""The recipe as a whole: its sections, the stages of a progressive run, and the rules between keys of different
sections that need no model (one small function per concern, applied in a fixed order). The rules that need the
model's config live in `longtune.parallel.layout_rules` (applied by `model_checks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from longtune.data_prep.user_error import UserError
from longtune.parallel.layout_rules import sequence_chunks_problem

from .recipe_sections import (
    DataSection,
    ExtensionSection,
    LaunchSection,
    MemorySection,
    ModelSection,
    ParallelSection,
    Section,
    StageGateSection,
    TrainSection,
)


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message says which key and why."""


STAGE_FIXED_KEYS = ("model.name_or_path", "train.output_dir")
"""Set by the stage runner: the previous stage's export, and train.output_dir/<stage name>."""


class StageSection(Section):
    """One stage of a progressive run: recipe keys that differ from the recipe's own, an optional gate.

    Recipe keys are written dotted (`train.max_steps: 200`) or as nested sections (`train: {max_steps:
    200}`, which is what `stages.1.train.max_steps=200` on the command line makes); both become dotted
    keys here."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run dir of the "
                             "stage under train.output_dir; default stageN (N from 1).")
    gate: StageGateSection = Field(default_factory=StageGateSection)

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls.model_fields:
                out[key] = value
            elif "." not in key and not isinstance(_section_class(key), type):
                raise ValueError(f"unknown key {key!r}; a stage holds name, gate and recipe keys, dotted "
                                 "(train.max_steps: 10) or as sections (train: {max_steps: 10})")
            else:
                out.update(_flatten_section_keys(key, value))
        return out

    @property
    def settings(self) -> dict[str, Any]:
        """The stage's recipe keys, dotted."""
        return dict(self.model_extra or {})


def _section_class(dotted: str) -> type[BaseModel] | None:
    """The schema class of a recipe section path (`parallel.sp`), or None when it is no section."""
    cls: type[BaseModel] = Recipe
    for name in dotted.split("."):
        field = cls.model_fields.get(name)
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)) or name == "stages":
            return None
        cls = ann
    return cls


def _flatten_section_keys(key: str, value: Any) -> dict[str, Any]:
    """`parallel: {sp: {ring: 2}}` → {"parallel.sp.ring": 2}; values of non-section keys stay whole."""
    if isinstance(value, dict) and _section_class(key) is not None:
        out: dict[str, Any] = {}
        for sub, sub_value in value.items():
            out.update(_flatten_section_keys(f"{key}.{sub}", sub_value))
        return out
    return {key: value}


# -- rules between sections (config only) ---------------------------------------------------------
# Each raises ValueError with the message the user sees; `Recipe._cross_field_checks` applies them in order.


def check_not_yet(recipe: Recipe) -> None:
    """Capabilities that later work items add are refused here, by name, rather than ignored."""
    par, mem = recipe.parallel, recipe.memory
    not_yet = {
        # Tensor parallelism hooks the MLP's input (the sequence-parallel gather); tiling it is untested.
        "memory.tiled_mlp with parallel.tp > 1": mem.tiled_mlp and par.tp > 1,
    }
    missing = [k for k, on in not_yet.items() if on]
    if missing:
        raise ValueError(f"{', '.join(missing)}: not available yet in this version of longtune")


def check_offload(recipe: Recipe) -> None:
    """memory.offload.*: what each switch needs (recompute, a tier that is used, a backend that owns the state)."""
    par, mem, off = recipe.parallel, recipe.memory, recipe.memory.offload
    if off.checkpoints and mem.recompute == "none":
        raise ValueError("memory.offload.checkpoints offloads the inputs of recomputed modules: it needs "
                         "memory.recompute=full or selective")
    if off.tier == "disk" and not (off.checkpoints or off.optimizer_swap or off.gradients):
        raise ValueError("memory.offload.tier=disk is where offload.checkpoints, offload.gradients and "
                         "offload.optimizer_swap put their tensors: turn one of them on")
    if off.dir is not None and off.tier != "disk":
        raise ValueError("memory.offload.dir is for memory.offload.tier=disk")
    if off.optimizer_swap and (par.backend != "native" or par.fsdp):
        raise ValueError("memory.offload.optimizer_swap is for parallel.backend=native without FSDP2; "
                         "FSDP2 and DeepSpeed offload optimizer state with memory.offload.optimizer")
    if off.gradients:
        several = {"parallel.backend=deepspeed": par.backend != "native", "parallel.fsdp": par.fsdp,
                   "parallel.dp > 1": (par.dp or 1) > 1, "parallel.sp > 1": par.sp.degree > 1,
                   "parallel.tp > 1": par.tp > 1, "parallel.pp > 1": par.pp > 1}
        refused = [k for k, on in several.items() if on]
        if refused:
            raise ValueError("memory.offload.gradients is for one process with parallel.backend=native "
                             f"(it owns its whole gradients), got {', '.join(refused)}")


def check_recompute(recipe: Recipe) -> None:
    mem = recipe.memory
    if mem.recompute == "none" and mem.recompute_modules:
        raise ValueError("memory.recompute_modules is for memory.recompute=selective or full, got "
                         f"{mem.recompute}")


def check_backend(recipe: Recipe) -> None:
    """What parallel.backend can do: native shards with FSDP2; deepspeed has ZeRO and no tp / pp."""
    par, off = recipe.parallel, recipe.memory.offload
    if par.backend == "native":
        if (off.optimizer or off.params) and not par.fsdp:
            raise ValueError("memory.offload.optimizer/params with parallel.backend=native need "
                             "parallel.fsdp=true (FSDP2 CPUOffloadPolicy)")
        return
    if par.fsdp:
        raise ValueError("parallel.fsdp=true is for parallel.backend=native; with deepspeed "
                         "use parallel.deepspeed.zero_stage")
    if par.tp > 1:
        raise ValueError(f"parallel.tp {par.tp} needs parallel.backend=native: the deepspeed "
                         "backend has no tensor parallelism")
    if par.pp > 1:
        raise ValueError(f"parallel.pp {par.pp} needs parallel.backend=native: the deepspeed "
                         "backend has no pipeline parallelism")
    if off.params and par.deepspeed.zero_stage != 3:
        raise ValueError("memory.offload.params needs parallel.deepspeed.zero_stage=3, got "
                         f"{par.deepspeed.zero_stage}")
    if off.optimizer and par.deepspeed.zero_stage == 0:
        raise ValueError("memory.offload.optimizer needs parallel.deepspeed.zero_stage >= 1")


def check_pipeline_schedule(recipe: Recipe) -> None:
    par = recipe.parallel
    per_rank = par.pp_stages_per_rank
    if par.pp_schedule == "interleaved_1f1b" and per_rank is not None and per_rank < 2:
        raise ValueError(f"parallel.pp_schedule interleaved_1f1b needs parallel.pp_stages_per_rank >= 2, "
                         f"got {per_rank}")
    if par.pp_schedule != "interleaved_1f1b" and per_rank not in (None, 1):
        raise ValueError(f"parallel.pp_stages_per_rank {per_rank} needs parallel.pp_schedule "
                         f"interleaved_1f1b ({par.pp_schedule} runs one stage per rank)")


def check_extension(recipe: Recipe) -> None:
    """extension.*: each method's own keys, and PoSE's need of a target longer than the rows."""
    ext, tr = recipe.extension, recipe.train
    if ext.enabled and ext.target_length is None and ext.factor is None:
        raise ValueError(f"extension.method={ext.method} needs extension.target_length or "
                         "extension.factor")
    if ext.rope_theta is not None and ext.method != "abf":
        raise ValueError(f"extension.rope_theta is the new base of method abf; method {ext.method} "
                         "does not use it")
    if ext.method == "abf" and ext.rope_theta is None:
        raise ValueError("extension.method=abf needs extension.rope_theta (the new base)")
    if not ext.enabled and (ext.target_length or ext.factor or ext.rope_theta):
        raise ValueError("extension.target_length/factor/rope_theta are set but extension.method is "
                         "none")
    if ext.pose.chunks == 1:
        raise ValueError("extension.pose.chunks 1 has nothing to skip between: use 2 or more (0 turns PoSE "
                         "off)")
    if ext.pose.chunks and not ext.enabled:
        raise ValueError("extension.pose simulates extension.target_length: it needs an extension.method")
    if ext.pose.chunks and ext.target_length is not None and ext.target_length <= tr.seq_len:
        raise ValueError(f"extension.pose: train.seq_len {tr.seq_len} already covers extension.target_length "
                         f"{ext.target_length}; PoSE is for rows shorter than the target")


def check_batch(recipe: Recipe) -> None:
    """With parallel.dp given, a step's rows split evenly; the world size is checked where it is known
    (`Recipe.data_parallel_size`)."""
    par, tr = recipe.parallel, recipe.train
    if par.dp is None:
        return
    per_step = par.dp * tr.micro_batch_size
    if tr.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size {tr.global_batch_size} is not divisible by "
                         f"parallel.dp × train.micro_batch_size (= {par.dp} × "
                         f"{tr.micro_batch_size} = {per_step})")


def check_sequence_chunks(recipe: Recipe) -> None:
    """memory.sequence_chunks: each layer recomputes chunk by chunk, so it replaces whole-layer recomputation; the
    chunks are cut from each rank's shard, which works with Ulysses and a contiguous ring but not with TP or a
    pipeline."""
    par, mem = recipe.parallel, recipe.memory
    zero_stage = par.deepspeed.zero_stage if par.backend == "deepspeed" else 0
    problem = sequence_chunks_problem(mem.sequence_chunks, mem.recompute, mem.recompute_modules, ring=par.sp.ring,
                                      ring_layout=par.sp.layout, tp=par.tp, pp=par.pp, zero_stage=zero_stage)
    if problem:
        raise ValueError(problem)


CONFIG_RULES = (check_not_yet, check_offload, check_recompute, check_sequence_chunks, check_backend,
                check_pipeline_schedule, check_extension, check_batch)
"""The rules between sections, in the order a recipe meets them (the first broken one is reported)."""


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    extension: ExtensionSection = Field(default_factory=ExtensionSection)
    data: DataSection = Field(default_factory=DataSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    train: TrainSection = Field(default_factory=TrainSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    stages: list[StageSection] = Field(default_factory=list, description="Progressive training: each stage "
                                       "holds name, gate and the recipe keys it changes (dotted, e.g. "
                                       "`train.max_steps: 200`), and trains from the previous stage's "
                                       "exported model in train.output_dir/NAME; empty: one ordinary run.")

    @model_validator(mode="after")
    def _cross_field_checks(self) -> Recipe:
        for rule in CONFIG_RULES:
            rule(self)
        self._check_stages()
        return self

    def _check_stages(self) -> None:
        names: dict[str, int] = {}
        first = None
        for index, stage in enumerate(self.stages):
            fixed = sorted(set(stage.settings) & set(STAGE_FIXED_KEYS))
            if fixed:
                raise ValueError(f"stages.{index}: {', '.join(fixed)} is set by the stage runner (the first stage "
                                 "trains the recipe's model, every later one the previous stage's export, "
                                 "each in train.output_dir/<stage name>)")
            name = self.stage_name(index)
            if name in names:
                raise ValueError(f"stages.{index}: name {name!r} is also the name of stages.{names[name]}")
            names[name] = index
            recipe = self.stage_recipe(index)
            if not recipe.train.export:
                raise ValueError(f"stages.{index} ({name}): train.export=false, but the next stage and the "
                                 "result are the exported model")
            first = first or recipe
            if recipe.process_count() != first.process_count():
                raise ValueError(f"stages.{index} ({name}) runs on {recipe.process_count()} processes, stages.0 "
                                 f"on {first.process_count()}: all stages run in one launch, so their "
                                 "dp × pp × sp × tp (or launch.nproc_per_node) must match")

    # -- derived values -------------------------------------------------------------------------

    def stage_name(self, index: int) -> str:
        return self.stages[index].name or f"stage{index + 1}"

    def stage_recipe(self, index: int) -> Recipe:
        """Stage `index` as an ordinary recipe: this one without `stages`, the stage's keys applied, its run
        dir train.output_dir/<stage name>. The model is still this recipe's; the stage runner chains it."""
        name = self.stage_name(index)
        data = self.model_dump(mode="json", exclude={"stages"})
        for key, value in self.stages[index].settings.items():
            node = data
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise RecipeError(f"stages.{index} ({name}): {key}: {part} is not a section")
            node[last] = value
        data["train"]["output_dir"] = str(Path(self.train.output_dir) / name)
        from .recipe import recipe_from_dict  # the loader's one-line errors; it imports this module

        return recipe_from_dict(data, source=f"stages.{index} ({name})")

    def data_parallel_size(self, world_size: int) -> int:
        """The dp degree for `world_size` processes; raises RecipeError naming the numbers."""
        mp = self.parallel.model_parallel_size
        if world_size % mp:
            raise RecipeError(f"world size {world_size} is not divisible by pp × sp × tp (= {mp})")
        dp = world_size // mp
        if self.parallel.dp is not None and self.parallel.dp != dp:
            raise RecipeError(f"world size {world_size} does not match parallel.dp {self.parallel.dp} × "
                              f"pp × sp × tp {mp} (= {self.parallel.dp * mp} processes)")
        per_step = dp * self.train.micro_batch_size
        if self.train.global_batch_size % per_step:
            raise RecipeError(f"train.global_batch_size {self.train.global_batch_size} is not divisible "
                              f"by dp × train.micro_batch_size (= {dp} × {self.train.micro_batch_size}) "
                              f"for world size {world_size}")
        return dp

    def process_count(self) -> int:
        """Processes a self-launched `longtune train` starts."""
        if self.launch.nproc_per_node is not None:
            return self.launch.nproc_per_node
        return (self.parallel.dp or 1) * self.parallel.model_parallel_size

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
