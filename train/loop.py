"""One training run: build everything from the recipe, train, checkpoint, export."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from longtune.parallel.backend import BackendSettings, create_backend
from longtune.parallel.dims import all_reduce_max, barrier, init_process_group, launched_world
from longtune.parallel.layout import Layout
from longtune.parallel.offload_io import offload_wait_seconds
from longtune.parallel.watchdog import start_watchdog

from .checkpoint import (
    check_resumable,
    checkpoint_layout,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .export import export_hf_model
from .loss import token_loss_sum
from .metrics import RunLogger, peak_memory_gib
from .recipe import Recipe
from .recipe_layout import layout_from_recipe
from .run_setup import setup_run
from .schedule import LRSchedule

log = logging.getLogger("longtune")


def backend_settings(recipe: Recipe) -> BackendSettings:
    """The optimizer and LR schedule the recipe asks for (the rest of what a backend needs is the Layout)."""
    tr = recipe.train
    return BackendSettings(lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps, weight_decay=tr.weight_decay,
                           grad_clip=tr.grad_clip,
                           lr_multiplier=LRSchedule(tr.max_steps, tr.warmup_steps, tr.schedule, tr.min_lr_ratio),
                           deepspeed_config=recipe.parallel.deepspeed.config)


def run_training(recipe: Recipe) -> Path:
    """Train as one rank of the launched world; returns the run dir. Under a launcher a watchdog thread
    ends the run when a rank stops sending heartbeats for train.hang_timeout_s (parallel/watchdog.py)."""
    if launched_world()[2] > 1:  # join first: the ranks leave the rendezvous together and so start beating
        init_process_group(recipe.train.collective_timeout_s)
    watchdog = start_watchdog(recipe.train.hang_timeout_s)
    try:
        return _train(recipe, setup_run(recipe))
    finally:
        if watchdog is not None:
            watchdog.stop()


def _train(recipe: Recipe, run) -> Path:
    tr, device = recipe.train, run.device
    run_dir = Path(tr.output_dir)
    layout = layout_from_recipe(recipe, run.world)
    backend = create_backend(recipe.parallel.backend, backend_settings(recipe), layout, run.dims, device,
                             run.build_model)
    resume_layout = checkpoint_layout(recipe, run.world)
    start_step, tokens_seen, found = _resume(run_dir, backend, resume_layout) if tr.resume else (0, 0, None)
    if run.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        run.tokenizer.save_pretrained(run_dir / "tokenizer")
    barrier()
    logger = RunLogger(run_dir, enabled=run.rank == 0, total_steps=tr.max_steps, start_step=start_step,
                       progress=tr.progress, wandb_mode=tr.wandb.mode, wandb_project=tr.wandb.project,
                       wandb_name=tr.wandb.name, config=recipe.model_dump(mode="json"))
    if found is not None:
        logger.message(f"resumed from {found} at step {start_step}")
    logger.message(describe_run(recipe, layout, run.world, device))

    backend.train_mode()
    last = None
    for step in range(start_step, tr.max_steps):
        started, waited = time.perf_counter(), offload_wait_seconds()
        lr = backend.lr
        totals = backend.run_micro_batches([run.model_inputs(mb) for mb in run.batches.for_step(step)],
                                           token_loss_sum)
        grad_norm = backend.step()
        elapsed = time.perf_counter() - started
        tokens_seen += int(totals.real_tokens)
        if totals.counted_tokens == 0:
            log.warning("step %d has no counted tokens (every label is ignored): loss 0, no update", step + 1)
        last = {
            "step": step + 1, "loss": totals.loss_sum / max(totals.counted_tokens, 1.0), "lr": lr,
            "grad_norm": grad_norm, "tokens": int(totals.real_tokens), "tokens_seen": tokens_seen,
            "tokens_per_s": totals.real_tokens / elapsed,
            "peak_mem_gib": all_reduce_max(peak_memory_gib(device), device), "step_time_s": elapsed,
            "offload_wait_s": all_reduce_max(offload_wait_seconds() - waited, device),
        }
        logger.log_step(last)
        done = step + 1
        if done == tr.max_steps or (tr.save_every and done % tr.save_every == 0):
            save_checkpoint(run_dir, done, backend,
                            {"tokens_seen": tokens_seen, "data_position": done * tr.global_batch_size,
                             "layout": resume_layout},
                            keep=tr.keep_checkpoints)
    if tr.export:
        _export(backend, run, run_dir, logger)
    logger.close()
    if last is not None:
        logger.message(f"done: {last['step']} steps, last loss {last['loss']:.4f}, "
                       f"{last['tokens_per_s']:.0f} tokens/s, peak {last['peak_mem_gib']:.2f} GiB/rank; "
                       f"run dir {run_dir}")
    return run_dir


def _resume(run_dir: Path, backend, resume_layout: dict) -> tuple[int, int, Path | None]:
    """(first step, tokens seen, checkpoint) from the newest complete checkpoint; (0, 0, None) without one."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return 0, 0, None
    check_resumable(found[1], resume_layout)
    state = load_checkpoint(found[1], backend)
    return state["step"], state["tokens_seen"], found[1]


def _export(backend, run, run_dir: Path, logger: RunLogger) -> None:
    """Collective: the HF model dir (safetensors) under run_dir/model, written by rank 0."""
    state_dict = backend.full_state_dict()
    if run.rank == 0:
        out = export_hf_model(state_dict, run.config, run.tokenizer, run_dir / "model", run.recipe.train.export_dtype)
        logger.message(f"exported {out}")
    barrier()


def describe_run(recipe: Recipe, layout: Layout, world: int, device) -> str:
    """The run's first line: world, degrees, backend, device, rows and micro-batches per step."""
    sp, tr = recipe.parallel.sp, recipe.train
    text = f", sp {sp.ring}×{sp.ulysses} (ring × ulysses, {sp.layout})" if layout.sp > 1 else ""
    text += f", tp {layout.tp}" if layout.tp > 1 else ""
    if layout.pp > 1:
        stages = f" × {layout.pp_stages_per_rank} stages" if layout.pp_stages_per_rank > 1 else ""
        text += f", pp {layout.pp}{stages} ({layout.pp_schedule})"
    return (f"world {world} (dp {layout.dp}{text}), backend {recipe.parallel.backend}, device {device.type}, "
            f"{tr.global_batch_size} rows × {tr.seq_len} tokens per step, "
            f"{layout.grad_accum} micro-batch(es) of {tr.micro_batch_size} per rank")
