"""The recipe: a YAML file validated into typed objects, with dotted command-line overrides.

Every key has a type and a description; unknown keys are errors that name the valid ones, and the
checks that involve several fields live in `Recipe._cross_field_checks` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import longtune.train as _train_pkg
from longtune.data_prep.yaml_config import apply_overrides as apply_dotted_overrides
from longtune.data_prep.yaml_config import unknown_key_message

RECIPES_DIR = Path(_train_pkg.__file__).resolve().parent.parent / "recipes"
"""Shipped recipes: `recipes/` of the checkout, or `longtune/recipes` of an installed package."""


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says which key and why."""

    user_facing = True  # the CLI prints it as one error line, without a traceback


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SP_ATTN_IMPLEMENTATION = "longtune_sp"
"""The name `longtune.parallel.sp_attention` registers its sequence-parallel attention under."""

_BUILTIN_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                                 "flex_attention", SP_ATTN_IMPLEMENTATION)


def known_attn_implementations() -> list[str]:
    """Attention implementations that need no download: transformers' registered ones (its
    `AttentionInterface`), eager, and longtune's sequence-parallel one. A Hub kernel (`org/repo`) is not one."""
    names = set(_BUILTIN_ATTN_IMPLEMENTATIONS)
    try:
        from transformers import AttentionInterface

        names.update(AttentionInterface().valid_keys())
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return sorted(n for n in names if "/" not in n)


def _check_attn_implementation(name: str) -> str:
    if name in _BUILTIN_ATTN_IMPLEMENTATIONS:  # the common case, without importing transformers
        return name
    known = known_attn_implementations()
    if "/" in name or ":" in name or name not in known:
        hub = " (a Hub kernel repo: longtune does not download kernels)" if "/" in name else ""
        raise ValueError(f"{name!r} is not a known attention implementation{hub}; use one of "
                         f"{', '.join(known)}")
    return name


class ModelSection(_Section):
    name_or_path: str = Field("tiny-llama", description="A local HF causal-LM dir, or a tiny flavour: "
                              "tiny-llama, tiny-qwen2, tiny-qwen3, tiny-mistral.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype. bfloat16 keeps fp32 master weights (autocast / FSDP2 "
        "mixed precision / DeepSpeed bf16).")
    attn_implementation: str = Field("sdpa", description="transformers attention implementation: eager, "
                                     "sdpa, flash_attention_2/3/4, flex_attention, another name transformers "
                                     "registers, or longtune_sp (what sequence parallelism uses); Hub kernels "
                                     "(org/repo) are refused: nothing is downloaded.")
    tokenizer: str | None = Field(None, description="Local tokenizer dir or tokenizer.json (never a Hub "
                                  "id: nothing is downloaded); default: the model dir's own, or the embedded "
                                  "tokenizer for tiny flavours.")
    config_overrides: dict[str, Any] = Field(default_factory=dict, description="Fields set on the HF "
                                             "config before the model is built (e.g. num_hidden_layers).")
    trust_remote_code: bool = Field(False, description="Allow custom modeling code from the model dir.")

    @field_validator("attn_implementation")
    @classmethod
    def _known_attn_implementation(cls, value: str) -> str:
        return _check_attn_implementation(value)


class PoseSection(_Section):
    chunks: int = Field(0, ge=0, description="PoSE (positional skip-wise training): split every document of "
                        "a row into this many chunks whose position ids jump ahead by seeded random skips, so "
                        "rows of train.seq_len cover positions up to extension.target_length (the paper uses "
                        "2); 0: off.")


class ExtensionSection(_Section):
    method: Literal["none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "abf"] = Field(
        "none", description="How positions are interpolated to reach target_length.")
    target_length: int | None = Field(None, gt=0, description="Context length after extension.")
    original_length: int | None = Field(None, gt=0, description="Pre-trained context length; default: "
                                        "the model config's max_position_embeddings.")
    factor: float | None = Field(None, gt=0, description="Scale factor; default target/original.")
    rope_theta: float | None = Field(None, gt=0, description="New RoPE base for `abf`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Method-specific rope parameters "
                                    "(e.g. beta_fast, low_freq_factor, short_factor).")
    pose: PoseSection = Field(default_factory=PoseSection)


class DataSection(_Section):
    path: str | None = Field(None, description="A packed corpus dir from `longtune prep`; null: the "
                             "embedded default corpus (Python's own documentation text).")
    document_masking: bool = Field(True, description="Positions restart and attention stops at "
                                   "document boundaries.")


class SequenceParallelSection(_Section):
    ulysses: int = Field(1, ge=1, description="Ulysses (all-to-all) degree; must divide the query heads.")
    ring: int = Field(1, ge=1, description="Ring attention degree.")
    ring_impl: Literal["ring", "zigzag"] = Field("zigzag", description="Ring layout: contiguous chunks "
                                                  "(ring) or causal-balanced chunks (zigzag).")
    kernel: Literal["torch_cpu", "torch_cuda_flash", "flash_attn"] | None = Field(
        None, description="Block attention kernel; null: the best available for the device.")

    @property
    def degree(self) -> int:
        return self.ring * self.ulysses

    @property
    def layout(self) -> str:
        """The sharding layout name of `longtune.parallel.sharding`."""
        return "contiguous" if self.ring_impl == "ring" else "zigzag"


class DeepSpeedSection(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage.")
    config: str | None = Field(None, description="A DeepSpeed JSON whose fields are added to the "
                               "generated config; \"auto\" values are filled from the recipe.")


class ParallelSection(_Section):
    backend: Literal["native", "deepspeed"] = Field("native", description="native: DDP or FSDP2; "
                                                    "deepspeed: ZeRO via deepspeed.initialize.")
    dp: int | None = Field(None, ge=1, description="Data-parallel degree; null: the world size divided "
                           "by the other degrees.")
    fsdp: bool = Field(False, description="native backend: shard with FSDP2 instead of DDP.")
    sp: SequenceParallelSection = Field(default_factory=SequenceParallelSection)
    tp: int = Field(1, ge=1, description="Tensor-parallel degree (native backend); must divide the query "
                    "and KV heads and the MLP width.")
    tp_sequence_parallel: bool = Field(True, description="With tp > 1, the norms and residual stream "
                                       "between blocks hold 1/tp of the sequence (reduce-scatter + "
                                       "all-gather); false: replicated (all-reduce).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree (native backend): the decoder layers "
                    "split into pp × pp_stages_per_rank stages.")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field(
        "1f1b", description="Pipeline schedule over the step's micro-batches (torch.distributed.pipelining).")
    pp_stages_per_rank: int | None = Field(None, ge=1, description="Pipeline stages per rank; null: 2 for "
                                           "interleaved_1f1b (which needs 2 or more), else 1 (the only value "
                                           "gpipe and 1f1b take).")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pipeline rank runs (pp_stages_per_rank with its default filled in)."""
        if self.pp_stages_per_rank is not None:
            return self.pp_stages_per_rank
        return 2 if self.pp_schedule == "interleaved_1f1b" else 1

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one replica of the model: pp × sp × tp."""
        return self.pp * self.sp.ring * self.sp.ulysses * self.tp


class OffloadSection(_Section):
    checkpoints: bool = Field(False, description="Keep the inputs of the recomputed modules (the hidden "
                              "states a checkpoint saves) in host memory (or memory.offload.tier) until "
                              "backward; needs memory.recompute.")
    activations: bool = Field(False, description="Keep every tensor autograd saves in host memory "
                              "(save_on_cpu; pinned on GPU).")
    optimizer: bool = Field(False, description="Optimizer state on the host (ZeRO offload_optimizer; "
                            "FSDP2 CPUOffloadPolicy).")
    params: bool = Field(False, description="Parameters on the host (ZeRO-3 offload_param; FSDP2 "
                         "CPUOffloadPolicy).")
    optimizer_swap: bool = Field(False, description="AdamW's state leaves the device after each step (to "
                                 "memory.offload.tier) and returns for the next: forward and backward run "
                                 "without it. parallel.backend=native without FSDP2.")
    gradients: bool = Field(False, description="Each gradient leaves the device (to memory.offload.tier) "
                            "as soon as backward has accumulated it and returns for the optimizer step: "
                            "backward holds one module's gradients, not every one it has passed. One "
                            "process, parallel.backend=native without FSDP2.")
    tier: Literal["host", "disk"] = Field("host", description="Where offload.checkpoints, offload.gradients "
                                          "and offload.optimizer_swap put their tensors: host memory, or "
                                          "files under memory.offload.dir (out of host memory too). "
                                          "offload.activations always uses host memory.")
    dir: str | None = Field(None, description="tier=disk: the directory for the files (one fresh "
                            "sub-directory per process, removed at exit); default train.output_dir/offload.")


class MemorySection(_Section):
    recompute: Literal["none", "full", "selective"] = Field("none", description="Activation "
                                                             "recomputation (non-reentrant checkpointing).")
    recompute_every: int = Field(2, ge=1, description="selective: recompute every k-th decoder layer.")
    recompute_modules: list[str] = Field(default_factory=list, description="selective: recompute these "
                                         "sub-modules of every layer (e.g. [mlp]) instead of whole layers. "
                                         "full: also checkpoint them inside each layer (nested), so a "
                                         "layer's backward holds one sub-module's activations at a time.")
    tiled_loss: bool = Field(False, description="Logits and loss in sequence chunks, each recomputed in "
                             "backward: the full length × vocabulary logits never exist.")
    tiled_loss_chunk: int = Field(2048, gt=0, description="tiled_loss: sequence positions per chunk (of "
                                  "every row of a micro-batch).")
    tiled_mlp: bool = Field(False, description="Each decoder layer's MLP in sequence chunks, each "
                            "recomputed in backward.")
    tiled_mlp_chunk: int = Field(4096, gt=0, description="tiled_mlp: sequence positions per chunk (of "
                                 "every row of a micro-batch).")
    offload: OffloadSection = Field(default_factory=OffloadSection)


class WandbSection(_Section):
    mode: Literal["disabled", "offline", "online"] = Field("disabled", description="wandb mode.")
    project: str = Field("longtune", description="wandb project.")
    name: str | None = Field(None, description="wandb run name; default: the output dir's name.")


class TrainSection(_Section):
    seq_len: int = Field(2048, gt=0, description="Tokens per training row.")
    max_steps: int = Field(100, gt=0, description="Optimizer steps.")
    lr: float = Field(2.0e-5, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Floor of the cosine or linear decay as a fraction "
                                "of lr.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Shape after warmup: decay "
                                                               "to min_lr_ratio × lr at max_steps, or constant.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables clipping.")
    global_batch_size: int = Field(8, gt=0, description="Rows per optimizer step over all ranks.")
    micro_batch_size: int = Field(1, gt=0, description="Rows per forward pass per data-parallel rank.")
    seed: int = Field(0, ge=0, description="Seeds model init, data order and RNG.")
    output_dir: str = Field("runs/example", description="Run dir: recipe.yaml, metrics.jsonl, "
                            "checkpoints/, model/.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    resume: bool = Field(True, description="Continue from the newest complete checkpoint in "
                         "output_dir when there is one (a corrupt newest one is moved aside to step_N.corrupt "
                         "and the newest good one is used).")
    overwrite: bool = Field(False, description="Start clean in an output_dir that already holds a run: remove "
                            "its checkpoints, metrics and model first. Without it, resume: false on such a dir is "
                            "an error (it would mix two runs).")
    export: bool = Field(True, description="Write an HF model dir (safetensors) to output_dir/model.")
    progress: bool = Field(True, description="Show a progress bar on rank 0.")
    hang_timeout_s: float = Field(300.0, ge=0, description="Several processes: every rank sends a heartbeat "
                                  "from a thread independent of the training step; a rank silent this long "
                                  "(stopped or hung) ends the run with one error line and exit code 1. 0 "
                                  "disables the watchdog.")
    collective_timeout_s: float = Field(600.0, gt=0, description="Timeout of the process group's collectives "
                                        "(init_process_group): a collective waiting longer fails the run.")
    wandb: WandbSection = Field(default_factory=WandbSection)


class LaunchSection(_Section):
    nproc_per_node: int | None = Field(None, ge=1, description="Processes `longtune train` starts; "
                                       "null: dp × pp × sp × tp.")


class StageGateSection(_Section):
    length: int | None = Field(None, gt=0, description="Evaluation length in tokens; default: the stage's "
                               "extension.target_length, else its train.seq_len.")
    perplexity_below: float | None = Field(None, gt=0, description="Pass when the single-window perplexity of "
                                           "the embedded long text at `length` is below this.")
    passkey_at_least: float | None = Field(None, ge=0, le=1, description="Pass when the passkey accuracy at "
                                           "`length` (needle depths 0, 0.5, 1) is at least this.")
    texts: int = Field(2, ge=1, description="perplexity_below: texts averaged.")
    trials: int = Field(3, ge=1, description="passkey_at_least: keys per depth.")

    @property
    def enabled(self) -> bool:
        return self.perplexity_below is not None or self.passkey_at_least is not None


STAGE_FIXED_KEYS = ("model.name_or_path", "train.output_dir")
"""Set by the stage runner: the previous stage's export, and train.output_dir/<stage name>."""


class StageSection(_Section):
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


class Recipe(_Section):
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
        par, mem, ext, tr = self.parallel, self.memory, self.extension, self.train
        # Capabilities that later work items add are refused here, by name, rather than ignored.
        not_yet = {
            # Tensor parallelism hooks lm_head's and the MLP's inputs; tiling under it is untested.
            "memory.tiled_loss with parallel.tp > 1": mem.tiled_loss and par.tp > 1,
            "memory.tiled_mlp with parallel.tp > 1": mem.tiled_mlp and par.tp > 1,
        }
        missing = [k for k, on in not_yet.items() if on]
        if missing:
            raise ValueError(f"{', '.join(missing)}: not available yet in this version of longtune")
        if mem.offload.checkpoints and mem.recompute == "none":
            raise ValueError("memory.offload.checkpoints offloads the inputs of recomputed modules: it needs "
                             "memory.recompute=full or selective")
        if mem.offload.tier == "disk" and not (mem.offload.checkpoints or mem.offload.optimizer_swap
                                               or mem.offload.gradients):
            raise ValueError("memory.offload.tier=disk is where offload.checkpoints, offload.gradients and "
                             "offload.optimizer_swap put their tensors: turn one of them on")
        if mem.offload.dir is not None and mem.offload.tier != "disk":
            raise ValueError("memory.offload.dir is for memory.offload.tier=disk")
        if mem.offload.optimizer_swap and (par.backend != "native" or par.fsdp):
            raise ValueError("memory.offload.optimizer_swap is for parallel.backend=native without FSDP2; "
                             "FSDP2 and DeepSpeed offload optimizer state with memory.offload.optimizer")
        if mem.offload.gradients:
            several = {"parallel.backend=deepspeed": par.backend != "native", "parallel.fsdp": par.fsdp,
                       "parallel.dp > 1": (par.dp or 1) > 1, "parallel.sp > 1": par.sp.degree > 1,
                       "parallel.tp > 1": par.tp > 1, "parallel.pp > 1": par.pp > 1}
            refused = [k for k, on in several.items() if on]
            if refused:
                raise ValueError("memory.offload.gradients is for one process with parallel.backend=native "
                                 f"(it owns its whole gradients), got {', '.join(refused)}")
        if mem.recompute == "none" and mem.recompute_modules:
            raise ValueError("memory.recompute_modules is for memory.recompute=selective or full, got "
                             f"{mem.recompute}")
        if par.backend == "native":
            if (mem.offload.optimizer or mem.offload.params) and not par.fsdp:
                raise ValueError("memory.offload.optimizer/params with parallel.backend=native need "
                                 "parallel.fsdp=true (FSDP2 CPUOffloadPolicy)")
        else:
            if par.fsdp:
                raise ValueError("parallel.fsdp=true is for parallel.backend=native; with deepspeed "
                                 "use parallel.deepspeed.zero_stage")
            if par.tp > 1:
                raise ValueError(f"parallel.tp {par.tp} needs parallel.backend=native: the deepspeed "
                                 "backend has no tensor parallelism")
            if par.pp > 1:
                raise ValueError(f"parallel.pp {par.pp} needs parallel.backend=native: the deepspeed "
                                 "backend has no pipeline parallelism")
            if mem.offload.params and par.deepspeed.zero_stage != 3:
                raise ValueError("memory.offload.params needs parallel.deepspeed.zero_stage=3, got "
                                 f"{par.deepspeed.zero_stage}")
            if mem.offload.optimizer and par.deepspeed.zero_stage == 0:
                raise ValueError("memory.offload.optimizer needs parallel.deepspeed.zero_stage >= 1")
        per_rank = par.pp_stages_per_rank
        if par.pp_schedule == "interleaved_1f1b" and per_rank is not None and per_rank < 2:
            raise ValueError(f"parallel.pp_schedule interleaved_1f1b needs parallel.pp_stages_per_rank >= 2, "
                             f"got {per_rank}")
        if par.pp_schedule != "interleaved_1f1b" and per_rank not in (None, 1):
            raise ValueError(f"parallel.pp_stages_per_rank {per_rank} needs parallel.pp_schedule "
                             f"interleaved_1f1b ({par.pp_schedule} runs one stage per rank)")
        if ext.method != "none" and ext.target_length is None and ext.factor is None:
            raise ValueError(f"extension.method={ext.method} needs extension.target_length or "
                             "extension.factor")
        if ext.rope_theta is not None and ext.method != "abf":
            raise ValueError(f"extension.rope_theta is the new base of method abf; method {ext.method} "
                             "does not use it")
        if ext.method == "abf" and ext.rope_theta is None:
            raise ValueError("extension.method=abf needs extension.rope_theta (the new base)")
        if ext.method == "none" and (ext.target_length or ext.factor or ext.rope_theta):
            raise ValueError("extension.target_length/factor/rope_theta are set but extension.method is "
                             "none")
        if ext.pose.chunks == 1:
            raise ValueError("extension.pose.chunks 1 has nothing to skip between: use 2 or more (0 turns PoSE "
                             "off)")
        if ext.pose.chunks and ext.method == "none":
            raise ValueError("extension.pose simulates extension.target_length: it needs an extension.method")
        if ext.pose.chunks and ext.target_length is not None and ext.target_length <= tr.seq_len:
            raise ValueError(f"extension.pose: train.seq_len {tr.seq_len} already covers extension.target_length "
                             f"{ext.target_length}; PoSE is for rows shorter than the target")
        if par.dp is not None:
            per_step = par.dp * tr.micro_batch_size
            if tr.global_batch_size % per_step:
                raise ValueError(f"train.global_batch_size {tr.global_batch_size} is not divisible by "
                                 f"parallel.dp × train.micro_batch_size (= {par.dp} × "
                                 f"{tr.micro_batch_size} = {per_step})")
            nproc = self.launch.nproc_per_node
            if nproc is not None and nproc % (par.dp * par.model_parallel_size):
                raise ValueError(f"launch.nproc_per_node {nproc} is not a multiple of dp × pp × sp × tp "
                                 f"(= {par.dp * par.model_parallel_size})")
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


# -- loading ----------------------------------------------------------------------------------


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with longtune (`longtune train NAME`)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if path.suffix not in (".yaml", ".yml") or not path.parent.parts:
        if shipped.is_file():
            return shipped
    raise RecipeError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe "
                      f"(shipped: {', '.join(shipped_recipes())})")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Dotted `section.key=value` overrides (values parsed as YAML); problems are RecipeErrors."""
    return apply_dotted_overrides(data, overrides, RecipeError)


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem becomes one RecipeError."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe {path}: cannot read it as YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections, got "
                          f"{type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        return unknown_key_message(loc, _valid_keys(loc[:-1]))
    if err["type"] == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return f"{where}: {msg}" if loc else msg  # loc is empty for the recipe-level cross-field checks
    got = err.get("input")
    return f"{where}: {err['msg']} (got {got!r})"


def _valid_keys(section_path: list[str]) -> list[str]:
    cls: type[BaseModel] = Recipe
    for name in section_path:
        if name.isdigit():  # an index into a list of sections (stages.1)
            continue
        ann = cls.model_fields[name].annotation
        if get_origin(ann) is list and get_args(ann):
            ann = get_args(ann)[0]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def recipe_reference_markdown() -> str:
    """The key reference in docs/recipes.md, generated from the schema (a test keeps them equal)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            if get_origin(ann) is Literal:
                kind = " \\| ".join(str(a) for a in get_args(ann))
            else:
                kind = (getattr(ann, "__name__", None) or str(ann).replace("typing.", "")).replace("|", "\\|")
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"| `{prefix}{name}` | {kind} | `{shown}` | {field.description or ''} |")
            item = get_args(ann)[0] if get_origin(ann) is list and get_args(ann) else None
            if isinstance(item, type) and issubclass(item, BaseModel):
                walk(item, f"{prefix}{name}[].")  # the keys of every list item

    walk(Recipe, "")
    return "\n".join(lines) + "\n"
