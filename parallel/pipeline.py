"""Pipeline parallelism with `torch.distributed.pipelining`: an HF causal LM split by hand into stages
(the tracer frontend cannot capture HF models), run by GPipe, 1F1B or interleaved 1F1B.

A stage (`DecoderStage`) holds the original submodules of its slice — the embeddings on the first
stage, a run of consecutive decoder layers, the final norm and lm_head on the last — under the HF
attribute names (`model.embed_tokens`, `model.layers.<i>`, `model.norm`, `lm_head`), so its state-dict
keys are the HF keys: DCP checkpoints and the export need no renaming. It calls the HF decoder layers
the way the HF model's forward does — rotary embeddings from `position_ids` with the model's own
`rotary_emb`, the causal / packed-document masks of `transformers.masking_utils` per layer attention
kind — without patching or copying any transformers code.

The schedule carries micro-batch *indices* only: a stage looks its micro-batch's inputs (input ids,
position ids, the sequence-parallel context, labels) up in the step's table, because the SP context
holds per-micro-batch document bounds that the schedule's tensor splitter cannot split. Only the
hidden states travel between stages, `[rows, local sequence, hidden]` in one dtype; that shape is
fixed for the run because the loop pads every row to `train.seq_len` under pipeline parallelism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import nn

from .micro_batch import MicroBatchInputs
from .tiling import LossFn, TiledLMHead, lm_head_computes_loss

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
"""torch.distributed.pipelining's schedules by recipe name (`_schedule_class`; imported when a pipeline is built:
the module takes seconds to import)."""


def _schedule_class(name: str):
    from torch.distributed import pipelining

    return {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
            "interleaved_1f1b": pipelining.ScheduleInterleaved1F1B}[name]
"""`parallel.pp_schedule` → torch schedule class (interleaved: several stages per rank)."""


_STEP_INPUTS: ContextVar[Sequence[MicroBatchInputs] | None] = ContextVar("longtune_pipeline_inputs", default=None)
_pending_loss_fn: ContextVar[LossFn | None] = ContextVar("longtune_pipeline_loss_fn", default=None)


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stages that pipeline rank `pp_rank` runs: `pp_rank + k·pp` (torch's looped placement, so
    stage `i` talks to ranks `i ± 1 mod pp` and the last stage sits on the last rank)."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive decoder layers per stage, as even as possible; the first stages take the remainder
    (the last stage also carries the final norm and lm_head)."""
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} pipeline stages for {num_layers} decoder layers: each stage needs one")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        end = start + base + (1 if stage < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges


def attention_kind(config, layer_index: int) -> str:
    """The mask a decoder layer attends with, as the HF model's forward picks it: `config.layer_types`
    (Qwen2, Qwen3), else sliding whenever the config sets a window (Mistral), else full (Llama)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_index]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def attention_masks(config, hidden_states: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]) -> dict:
    """The masks of `transformers.masking_utils` that the HF model builds for these inputs (no padding
    mask, no cache): causal, block-diagonal for packed documents (from `position_ids`), or None where the
    attention implementation builds its own (sdpa's `is_causal`, longtune's sequence-parallel one)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    return {kind: builders[kind](config=config, inputs_embeds=hidden_states, attention_mask=None,
                                 past_key_values=None, position_ids=position_ids) for kind in kinds}


class _DecoderBody(nn.Module):
    """The HF decoder's submodules that one stage holds, under their HF names (a placeholder of
    `model.model`: state-dict keys stay `model.embed_tokens.*`, `model.layers.<i>.*`, `model.norm.*`)."""

    def __init__(self, decoder: nn.Module, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.embed_tokens = decoder.embed_tokens if first else None
        # Keyed by the layer's index in the whole model, so the keys are the HF ModuleList's.
        self.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in layers})
        self.norm = decoder.norm if last else None
        self.rotary_emb = decoder.rotary_emb  # no parameters: every stage rotates its own positions


class DecoderStage(nn.Module):
    """One pipeline stage of an HF causal LM: `forward(hidden_states, micro_batch=index)` → hidden states
    for the next stage, or from the last stage the logits (with a tiled lm_head: the loss sum)."""

    def __init__(self, causal_lm: nn.Module, layers: range, *, stage_index: int, num_stages: int,
                 boundary_dtype: torch.dtype) -> None:
        super().__init__()
        self.config = causal_lm.config
        self.stage_index, self.num_stages = stage_index, num_stages
        first, last = stage_index == 0, stage_index == num_stages - 1
        self.model = _DecoderBody(causal_lm.model, layers, first=first, last=last)
        self.lm_head = causal_lm.lm_head if last else None
        self.boundary_dtype = boundary_dtype
        self.boundary_split = 1  # the sent activations hold 1/boundary_split of the sequence (TP's SP norms)
        self._kinds = {name: attention_kind(self.config, int(name)) for name in self.model.layers}

    @property
    def is_first(self) -> bool:
        return self.model.embed_tokens is not None

    @property
    def is_last(self) -> bool:
        return self.lm_head is not None

    def forward(self, hidden_states: torch.Tensor | None = None, *, micro_batch: torch.Tensor) -> torch.Tensor:
        table = _STEP_INPUTS.get()
        if table is None:
            raise RuntimeError("a pipeline stage runs inside micro_batch_inputs(...), which provides its inputs")
        entry = table[int(micro_batch)]
        kwargs = dict(entry.inputs)
        input_ids, position_ids = kwargs.pop("input_ids"), kwargs.pop("position_ids")
        if self.is_first:
            hidden_states = self.model.embed_tokens(input_ids)
        position_embeddings = self.model.rotary_emb(hidden_states, position_ids=position_ids)
        masks = attention_masks(self.config, hidden_states, position_ids, set(self._kinds.values()))
        for name, layer in self.model.layers.items():
            hidden_states = layer(hidden_states, attention_mask=masks[self._kinds[name]],
                                  position_embeddings=position_embeddings, position_ids=position_ids,
                                  past_key_values=None, use_cache=False, **kwargs)
        if not self.is_last:
            return hidden_states.to(self.boundary_dtype)
        tiled = isinstance(self.lm_head, TiledLMHead)
        # The norm inside the loss context too: under a tiled loss it runs in the head's chunks (DeferredNorm).
        with lm_head_computes_loss(entry.labels if tiled else None, _pending_loss_fn.get()):
            return self.lm_head(self.model.norm(hidden_states))


def apply_stage_boundaries(stage: DecoderStage, tp_mesh) -> None:
    """Tensor parallelism with sequence-parallel norms: the residual stream is a DTensor sharded over the
    sequence (`Shard(1)`) on the tp mesh. Each tp rank sends its local shard to the next stage, whose input
    becomes that DTensor again (torch's PrepareModuleInput / PrepareModuleOutput on the stage module)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, parallelize_module

    if not stage.is_first:
        parallelize_module(stage, tp_mesh, PrepareModuleInput(input_layouts=(Shard(1),),
                                                             desired_input_layouts=(Shard(1),),
                                                             use_local_output=False))
    if not stage.is_last:
        parallelize_module(stage, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1),
                                                              desired_output_layouts=Shard(1),
                                                              use_local_output=True))
    stage.boundary_split = tp_mesh.size()


def split_stages(causal_lm: nn.Module, pp: int, pp_rank: int, stages_per_rank: int,
                 boundary_dtype: torch.dtype) -> list[DecoderStage]:
    """This pipeline rank's stages of `causal_lm`; the other stages' modules are left to be freed."""
    num_stages = pp * stages_per_rank
    ranges = stage_layers(causal_lm.config.num_hidden_layers, num_stages)
    return [DecoderStage(causal_lm, ranges[i], stage_index=i, num_stages=num_stages, boundary_dtype=boundary_dtype)
            for i in stage_ids(pp_rank, pp, stages_per_rank)]


def _stage_of(part: nn.Module) -> DecoderStage:
    """The DecoderStage inside a data-parallel wrapper (DDP keeps it as `.module`; FSDP2 in place)."""
    stage = getattr(part, "module", part)
    if not isinstance(stage, DecoderStage):
        raise TypeError(f"not a pipeline stage: {type(part).__name__}")
    return stage


class PipelineRunner:
    """Runs one optimizer step's micro-batches through this rank's stages with the recipe's schedule.

    Gradients accumulate as `loss_fn(output, labels) × scale` per micro-batch (the schedule does not
    divide by the number of micro-batches), so with `scale = multiplier / global token count` they are
    exactly those of the global token mean, as in the loop without pipelining.
    """

    def __init__(self, parts: list[nn.Module], *, schedule: str, micro_batches: int, group: dist.ProcessGroup,
                 device: torch.device) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        self.parts, self.schedule_name, self.micro_batches = parts, schedule, micro_batches
        self.group, self.device = group, device
        self.stages = [_stage_of(part) for part in parts]
        self._schedule = None
        self._shape: tuple[int, int] | None = None
        self._loss_fn: LossFn | None = None
        self._scale = 1.0
        self._loss_sums: list[torch.Tensor] = []

    def _build(self, rows: int, length: int) -> None:
        """Stages with static shapes (no metadata round trip), then the schedule."""
        from torch.distributed import pipelining

        stages = []
        for part, stage in zip(self.parts, self.stages, strict=True):
            # requires_grad: the metadata says which activations carry gradients back to the previous stage.
            hidden = torch.empty(rows, length // stage.boundary_split, stage.config.hidden_size,
                                 dtype=stage.boundary_dtype, device="meta", requires_grad=True)
            if stage.is_last:
                tiled = isinstance(stage.lm_head, TiledLMHead)
                output = torch.empty(() if tiled else (rows, length, stage.config.vocab_size), device="meta",
                                     requires_grad=True)
            else:
                output = hidden
            stages.append(pipelining.PipelineStage(part, stage.stage_index, stage.num_stages, self.device,
                                        input_args=() if stage.is_first else hidden, output_args=output,
                                        group=self.group))
        cls = _schedule_class(self.schedule_name)
        first = stages if self.schedule_name == "interleaved_1f1b" else stages[0]
        self._schedule = cls(first, n_microbatches=self.micro_batches, loss_fn=self._loss, scale_grads=False)
        self._shape = (rows, length)

    def _loss(self, output: torch.Tensor, micro_batch: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function on the last stage: `target` is the micro-batch index."""
        table = _STEP_INPUTS.get()
        labels = table[int(micro_batch)].labels
        loss_sum = output if output.dim() == 0 else self._loss_fn(output, labels)
        self._loss_sums.append(loss_sum.detach())
        return loss_sum * self._scale

    def step(self, micro_batches: Sequence[MicroBatchInputs], loss_fn: LossFn, scale: float) -> float:
        """Forward and backward of every micro-batch; returns this rank's sum of token losses (the sum of
        the last stage's micro-batches; 0 on ranks without the last stage). Collective over the pipeline."""
        if len(micro_batches) != self.micro_batches:
            raise ValueError(f"the pipeline schedule was built for {self.micro_batches} micro-batches per step, "
                             f"got {len(micro_batches)}")
        shapes = {tuple(mb.inputs["input_ids"].shape) for mb in micro_batches}
        if len(shapes) != 1 or (self._shape is not None and shapes != {self._shape}):
            raise ValueError(f"pipeline stages exchange fixed shapes: micro-batch input shapes {sorted(shapes)}"
                             + (f", built for {self._shape}" if self._shape else ""))
        if self._schedule is None:
            self._build(*next(iter(shapes)))
        self._loss_fn, self._scale, self._loss_sums = loss_fn, scale, []
        indices = torch.arange(self.micro_batches)
        with micro_batch_inputs(micro_batches, loss_fn):
            self._schedule.step(micro_batch=indices, target=indices, return_outputs=False)
        # On gloo, collectives that follow step() without a barrier can abort (cpu-feasibility.md); the
        # pipeline's P2P has its own group, and one barrier per step keeps that trap closed regardless.
        dist.barrier(group=self.group)
        return float(torch.stack(self._loss_sums).sum()) if self._loss_sums else 0.0


@contextlib.contextmanager
def micro_batch_inputs(micro_batches: Sequence[MicroBatchInputs], loss_fn: LossFn | None = None) -> Iterator[None]:
    """For the stage forwards inside: `micro_batch=i` means `micro_batches[i]`; a tiled lm_head computes
    `loss_fn` (the runner binds these around each schedule step)."""
    inputs_token, loss_token = _STEP_INPUTS.set(micro_batches), _pending_loss_fn.set(loss_fn)
    try:
        yield
    finally:
        _STEP_INPUTS.reset(inputs_token)
        _pending_loss_fn.reset(loss_token)


def gather_stage_state_dicts(state_dict: dict[str, torch.Tensor], *, pp_rank: int,
                             group: dist.ProcessGroup) -> dict[str, torch.Tensor] | None:
    """Collective over the pipeline group of global rank 0 (the ranks whose other coordinates are 0):
    every stage's full state dict, on CPU, merged on rank 0; None on the other ranks."""
    gathered: list | None = [None] * dist.get_world_size(group) if pp_rank == 0 else None
    dist.gather_object({k: v.cpu() for k, v in state_dict.items()}, gathered, dst=0, group=group)
    if pp_rank != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged

