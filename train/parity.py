"""Parity of a recipe's parallel layout (`longtune parity RECIPE`): does it compute what one process computes?

Each rank builds the model with the recipe's layout (`parallelize()` without the data-parallel wrapper:
tensor parallelism, sequence-parallel attention, tiling, recomputation) and runs the first steps'
micro-batches in the recipe's `model.dtype`; rank 0 also runs the same rows through the plain model on
one process, twice: in that dtype, and in float64 on the CPU (float64 is always available there). The
weights are the initial ones at every step (no optimizer step), so any difference is the layout's.

Both runs are measured against the float64 one: the loss's relative error and the largest relative gradient
error over every parameter (`max|g − g₆₄| / max|g₆₄|`). The one-process error is the noise of the dtype on
this model and these rows; the layout passes when its own error is within a multiple of it:

- float32: layout error ≤ 8 × one-process error + 1e-6. The layout sums in other orders (ring blocks merged
  by their log-sum-exps, gradients all-reduced over ranks, tensor-parallel partial sums), each as valid as
  the one-process order; such fp32 errors differ by a small factor from run to run and grow with depth
  (30 layers: ~1e-5), which is why a fixed tolerance is no verdict. 8 leaves room for that spread; a wrong
  mask, LSE or merge is off by orders of magnitude more. The floor (~8 fp32 ulps) covers a one-process
  error that happens to be near zero.
- bfloat16 (fp32 master weights under autocast, as training runs it): layout error ≤ 2 × one-process
  error + 1e-3, the bound the kernel tests use: both are bf16 roundings of the same computation, so their
  distances to float64 are of one size.

`--tol` replaces the bound: layout error ≤ tol. The float64 model runs the model's own code, so the few
places where it computes in fp32 by design (RMSNorm's variance, the rotary angles) stay fp32 there too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from longtune.parallel.dims import all_reduce_sum
from longtune.parallel.micro_batch import forward_backward
from longtune.parallel.parallelize import parallelize

from .data import StepBatches
from .loss import token_loss_sum
from .recipe_layout import layout_from_recipe
from .run_setup import RunSetup, setup_run

NOISE_FACTOR = {"float32": 8.0, "bfloat16": 2.0}
"""The layout's error may be this multiple of the one-process error (both against float64); module docstring."""

NOISE_FLOOR = {"float32": 1e-6, "bfloat16": 1e-3}
"""Added to the bound: covers a one-process error that happens to be near zero."""

_WRAPPER_PREFIX = "_checkpoint_wrapped_module."
"""What recomputation and tiling wrappers add to parameter names (the plain model has none)."""

Gradients = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Errors:
    """A run's distance to the float64 reference: relative loss error, largest relative gradient error and
    the parameter that has it."""

    loss: float
    grad: float
    worst: str


def relative_errors(loss: float, grads: Gradients, ref_loss: float, ref_grads: Gradients) -> Errors:
    """`loss`, `grads` against `ref_loss`, `ref_grads` (the float64 run); a NaN or Inf gradient is an
    infinite error."""
    worst, worst_name = 0.0, ""
    for name, ref in ref_grads.items():
        g = grads[name].double()
        r = ((g - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item() if torch.isfinite(g).all() \
            else float("inf")
        if r > worst or not worst_name:
            worst, worst_name = r, name
    return Errors(abs(loss - ref_loss) / max(abs(ref_loss), 1e-300), worst, worst_name)


@dataclass(frozen=True)
class Bound:
    """The largest layout error that passes: `factor × one-process error + floor`, or a fixed `tol`."""

    factor: float
    floor: float
    tol: float | None = None

    @classmethod
    def for_dtype(cls, dtype: str, tol: float | None = None) -> Bound:
        return cls(NOISE_FACTOR[dtype], NOISE_FLOOR[dtype], tol)

    def of(self, noise: float) -> float:
        return self.tol if self.tol is not None else self.factor * noise + self.floor

    def describe(self, dtype: str) -> str:
        if self.tol is not None:
            return f"layout error ≤ {self.tol:g} (--tol)"
        return f"layout error ≤ {self.factor:g} × the {dtype} 1-process error + {self.floor:g}"

    def passes(self, layout: Errors, noise: Errors) -> bool:
        return layout.loss <= self.of(noise.loss) and layout.grad <= self.of(noise.grad)


def _autocast(device_type: str, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 as the native backend computes it: fp32 weights under autocast."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _layout_gradients(run: RunSetup, model: torch.nn.Module, step: int) -> tuple[float, Gradients]:
    model.zero_grad(set_to_none=True)
    micro = [run.model_inputs(mb) for mb in run.batches.for_step(step)]
    count, = all_reduce_sum([sum(mb.counted_tokens for mb in micro)], run.device)
    bf16 = run.recipe.model.dtype == "bfloat16"
    # The training step's forward and backward (parallel/micro_batch.py), on the model without its
    # data-parallel wrapper.
    with _autocast(run.device.type, bf16):
        local = forward_backward(micro, lambda **inputs: model(**inputs, use_cache=False).logits,
                                 lambda loss, last: loss.backward(), token_loss_sum, 1.0 / max(count, 1.0))
    total, = all_reduce_sum([local], run.device)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if isinstance(g, DTensor):
            g = g.full_tensor()  # the tp ranks' shards (or partial sums) made whole on every tp rank
        if dist.is_initialized():
            # Partial gradients of the global token mean: their sum is the gradient. The tp ranks of a
            # replica hold the same whole gradient, but `count` counted their rows tp times too.
            dist.all_reduce(g)
        grads[name.replace(_WRAPPER_PREFIX, "")] = g.detach().cpu()
    return total / max(count, 1.0), grads


def _one_process_gradients(run: RunSetup, model: torch.nn.Module, step: int, dtype: torch.dtype,
                           bf16: bool = False) -> tuple[float, Gradients]:
    """The step's rows through the plain `model` on this process, its weights in `dtype` (under bf16
    autocast with `bf16`); the weights are left in float32 (exact: they were float32 values)."""
    tr = run.recipe.train
    rows = StepBatches(run.corpus, seed=tr.seed, global_batch=tr.global_batch_size,
                       micro_batch=tr.micro_batch_size, dp=1, dp_rank=0, pad_id=run.pad_id,
                       document_masking=run.recipe.data.document_masking).for_step(step)
    model.to(dtype)
    model.zero_grad(set_to_none=True)
    count = sum(mb.counted_tokens for mb in rows)
    total = 0.0
    with _autocast("cpu", bf16):
        for mb in rows:
            logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
            loss_sum = token_loss_sum(logits, mb.labels)
            (loss_sum / max(count, 1)).backward()
            total += loss_sum.item()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.to(torch.float32)
    return total / max(count, 1), grads


@dataclass(frozen=True)
class StepParity:
    """One step: the float64 loss, the layout's loss, both runs' errors against float64 and the verdict."""

    step: int
    ref_loss: float
    loss: float
    layout: Errors
    noise: Errors
    ok: bool


def check_parity(recipe, steps: int, tol: float | None = None) -> list[StepParity]:
    """Run the check on this rank (every rank of the recipe's world calls it); rank 0 prints the table and
    PASS or FAIL, and returns one result per step (the other ranks: none)."""
    run = setup_run(recipe)
    layout = layout_from_recipe(recipe, run.world)
    model, = parallelize(run.build_model(run.device), run.dims, layout, data_parallel="none", device=run.device)
    dtype = recipe.model.dtype
    bound = Bound.for_dtype(dtype, tol)
    reference = run.build_model("cpu") if run.rank == 0 else None
    if run.rank == 0:
        print(f"parity of {run.world} processes (dp {run.dims.dp}, sp {run.dims.sp_ring}×{run.dims.sp_ulysses} "
              f"ring × ulysses, {recipe.parallel.sp.layout}, tp {run.dims.tp}) against 1 process, {dtype}; "
              f"errors relative to 1 process in float64: {bound.describe(dtype)}")
        print(f"| step | loss (float64) | loss (layout) | loss err. 1 process {dtype} | loss err. layout "
              f"| loss bound | grad err. 1 process {dtype} | grad err. layout | grad bound | worst parameter | "
              "verdict |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    results: list[StepParity] = []
    for step in range(steps):
        loss, grads = _layout_gradients(run, model, step)
        if run.rank != 0:
            continue
        ref_loss, ref_grads = _one_process_gradients(run, reference, step, torch.float64)
        one_loss, one_grads = _one_process_gradients(run, reference, step, torch.float32, bf16=dtype == "bfloat16")
        layout_errors = relative_errors(loss, grads, ref_loss, ref_grads)
        noise = relative_errors(one_loss, one_grads, ref_loss, ref_grads)
        result = StepParity(step + 1, ref_loss, loss, layout_errors, noise, bound.passes(layout_errors, noise))
        results.append(result)
        print(format_row(result, bound), flush=True)
    if run.rank == 0:
        print("PASS" if all(r.ok for r in results) else "FAIL", flush=True)
    return results


def format_row(r: StepParity, bound: Bound) -> str:
    return (f"| {r.step} | {r.ref_loss:.8f} | {r.loss:.8f} | {r.noise.loss:.2e} | {r.layout.loss:.2e} | "
            f"{bound.of(r.noise.loss):.2e} | {r.noise.grad:.2e} | {r.layout.grad:.2e} | {bound.of(r.noise.grad):.2e} "
            f"| {r.layout.worst} | {'ok' if r.ok else 'FAIL'} |")
