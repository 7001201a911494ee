"""`longtune parity RECIPE`: does the recipe's parallel layout compute what one process computes?

Each rank builds the model with the recipe's layout (sequence, tensor and data parallelism) and
runs the first steps' micro-batches; rank 0 also runs the same rows through the plain single-process
model. Per step it prints the loss of both and the largest relative gradient difference (over every
parameter, `max|g − g₁| / max|g₁|`), then PASS or FAIL against the tolerance. The weights are the
initial ones at every step (no optimizer step), in fp32, so any difference is the layout's.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from longtune.parallel.dims import all_reduce_sum, build_mesh
from longtune.parallel.parallelize import decoder_layers
from longtune.parallel.tensor_parallel import apply_tensor_parallel

from .data import IGNORE_INDEX, StepBatches
from .loss import token_loss_sum
from .recipe import RecipeError, load_recipe
from .run_setup import RunSetup, setup_run


def _layout_gradients(run: RunSetup, model: torch.nn.Module, step: int) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    micro = [run.model_inputs(mb) for mb in run.batches.for_step(step)]
    count, = all_reduce_sum([sum(int((labels != IGNORE_INDEX).sum()) for _, labels, _ in micro)], run.device)
    local = 0.0
    for inputs, labels, _ in micro:
        loss_sum = token_loss_sum(model(**inputs, use_cache=False).logits, labels)
        (loss_sum / max(count, 1.0)).backward()
        local += loss_sum.item()
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
        grads[name] = g.detach().cpu()
    return total / max(count, 1.0), grads


def _reference_gradients(run: RunSetup, model: torch.nn.Module, step: int) -> tuple[float, dict]:
    tr = run.recipe.train
    rows = StepBatches(run.corpus, seed=tr.seed, global_batch=tr.global_batch_size,
                       micro_batch=tr.micro_batch_size, dp=1, dp_rank=0, pad_id=run.pad_id,
                       document_masking=run.recipe.data.document_masking).for_step(step)
    model.zero_grad(set_to_none=True)
    count = sum(mb.counted_tokens for mb in rows)
    total = 0.0
    for mb in rows:
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
        loss_sum = token_loss_sum(logits, mb.labels)
        (loss_sum / max(count, 1)).backward()
        total += loss_sum.item()
    return total / max(count, 1), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check_parity(recipe, steps: int, tol: float) -> bool:
    run = setup_run(recipe)
    model = run.build_model(run.device)
    if run.dims.tp > 1:
        apply_tensor_parallel(model, decoder_layers(model), build_mesh(run.dims, run.device.type)["tp"],
                              sequence_parallel=recipe.parallel.tp_sequence_parallel)
    reference = run.build_model("cpu", attn_implementation=recipe.model.attn_implementation) \
        if run.rank == 0 else None
    ok = True
    if run.rank == 0:
        print(f"parity of {run.world} processes (dp {run.dims.dp}, sp {run.dims.sp_ring}×{run.dims.sp_ulysses} "
              f"ring × ulysses, {recipe.parallel.sp.layout}, tp {run.dims.tp}) against 1 process, fp32, "
              f"tolerance {tol:g}")
        print("| step | loss (1 process) | loss (layout) | loss rel. diff | max grad rel. diff | worst parameter |")
        print("|---|---|---|---|---|---|")
    for step in range(steps):
        loss, grads = _layout_gradients(run, model, step)
        if run.rank != 0:
            continue
        ref_loss, ref_grads = _reference_gradients(run, reference, step)
        worst, worst_name = 0.0, ""
        for name, g in grads.items():
            r = ((g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-30)).item()
            if not torch.isfinite(g).all():
                r = float("inf")
            if r > worst:
                worst, worst_name = r, name
        loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
        ok &= loss_rel <= tol and worst <= tol
        print(f"| {step + 1} | {ref_loss:.8f} | {loss:.8f} | {loss_rel:.2e} | {worst:.2e} | {worst_name} |")
    if run.rank == 0:
        print("PASS" if ok else "FAIL", flush=True)
    return ok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtune parity", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    p.add_argument("--steps", type=int, default=2, help="how many first steps' batches to check (default 2)")
    p.add_argument("--tol", type=float, default=1e-5, help="relative tolerance (default 1e-5, fp32)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry of `longtune parity` (re-launches under torchrun) and of each rank."""
    from .cli import _fail, _strip_launcher_args, relaunch_under_torchrun

    argv = _strip_launcher_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides + ["model.dtype=float32"])
        if recipe.parallel.pp > 1:
            # Each pipeline rank holds other parameters; the pp tests compare loss curves and exports instead.
            raise RecipeError(f"longtune parity compares whole-model gradients: parallel.pp {recipe.parallel.pp} "
                              "is not supported (compare `longtune train` loss curves instead)")
        if recipe.extension.pose.chunks:
            # The 1-process reference runs transformers' attention, which would cut every PoSE skip.
            raise RecipeError("longtune parity's reference uses transformers' attention, which reads PoSE's "
                              "position skips as document starts: run it without extension.pose")
    except Exception as exc:
        if getattr(exc, "user_facing", False):
            return _fail(str(exc))
        raise
    nproc = recipe.process_count()
    if "WORLD_SIZE" not in os.environ and nproc > 1:
        return relaunch_under_torchrun(nproc, argv, module="longtune.train.parity")
    try:
        ok = check_parity(recipe, args.steps, args.tol)
    except Exception as exc:
        if getattr(exc, "user_facing", False):
            return _fail(str(exc))
        raise
    code = 0 if ok else 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if dist.is_initialized():
            dist.barrier()
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
