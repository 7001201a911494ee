"""One training run: build everything from the recipe, train, checkpoint, export."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from longtune.parallel.backend import BackendSettings, create_backend
from longtune.parallel.dims import (
    all_reduce_max,
    all_reduce_sum,
    barrier,
    init_process_group,
    launched_world,
)
from longtune.parallel.pipeline import StageInputs
from longtune.parallel.recompute import RecomputeSettings, activation_offload
from longtune.parallel.tiling import lm_head_computes_loss
from longtune.parallel.watchdog import start_watchdog

from .checkpoint import (
    check_resumable,
    checkpoint_layout,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .data import IGNORE_INDEX
from .export import export_hf_model
from .loss import token_loss_sum
from .metrics import RunLogger, peak_memory_gib
from .recipe import Recipe
from .run_setup import setup_run
from .schedule import LRSchedule

log = logging.getLogger("longtune")


def offload_dir(recipe: Recipe) -> str | None:
    """The disk tier's directory (None: host memory); every process makes its own sub-directory in it."""
    off = recipe.memory.offload
    if off.tier != "disk":
        return None
    return off.dir or str(Path(recipe.train.output_dir) / "offload")


def backend_settings(recipe: Recipe, grad_accum: int) -> BackendSettings:
    tr, par, mem = recipe.train, recipe.parallel, recipe.memory
    return BackendSettings(
        lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps, weight_decay=tr.weight_decay, grad_clip=tr.grad_clip,
        lr_multiplier=LRSchedule(tr.max_steps, tr.warmup_steps, tr.schedule, tr.min_lr_ratio),
        grad_accum=grad_accum, micro_batch_size=tr.micro_batch_size,
        bf16=recipe.model.dtype == "bfloat16", fsdp=par.fsdp, zero_stage=par.deepspeed.zero_stage,
        offload_optimizer=mem.offload.optimizer, offload_params=mem.offload.params,
        optimizer_swap=mem.offload.optimizer_swap,
        optimizer_swap_dir=offload_dir(recipe) if mem.offload.optimizer_swap else None,
        gradient_offload=mem.offload.gradients,
        gradient_offload_dir=offload_dir(recipe) if mem.offload.gradients else None,
        deepspeed_config=par.deepspeed.config,
        recompute=RecomputeSettings(mem.recompute, mem.recompute_every, tuple(mem.recompute_modules),
                                    offload_checkpoints=mem.offload.checkpoints,
                                    offload_dir=offload_dir(recipe) if mem.offload.checkpoints else None,
                                    tiled_mlp_chunk=mem.tiled_mlp_chunk if mem.tiled_mlp else 0,
                                    tiled_loss_chunk=mem.tiled_loss_chunk if mem.tiled_loss else 0),
        tp_sequence_parallel=par.tp_sequence_parallel,
        pp_schedule=par.pp_schedule, pp_stages_per_rank=par.stages_per_rank,
    )


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
    rank, world, dims, device, tr = run.rank, run.world, run.dims, run.device, recipe.train
    dp, sp, batches, tokenizer, config = dims.dp, recipe.parallel.sp, run.batches, run.tokenizer, run.config
    run_dir = Path(tr.output_dir)

    backend = create_backend(recipe.parallel.backend, backend_settings(recipe, batches.grad_accum), dims,
                             device, run.build_model)

    start_step, tokens_seen = 0, 0
    layout = checkpoint_layout(recipe, world)
    found = latest_checkpoint(run_dir) if tr.resume else None
    if found is not None:
        check_resumable(found[1], layout)
        state = load_checkpoint(found[1], backend)
        start_step, tokens_seen = state["step"], state["tokens_seen"]

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        tokenizer.save_pretrained(run_dir / "tokenizer")
    barrier()

    logger = RunLogger(run_dir, enabled=rank == 0, total_steps=tr.max_steps, start_step=start_step,
                       progress=tr.progress, wandb_mode=tr.wandb.mode, wandb_project=tr.wandb.project,
                       wandb_name=tr.wandb.name, config=recipe.model_dump(mode="json"))
    if found is not None:
        logger.message(f"resumed from {found[1]} at step {start_step}")
    sp_text = f", sp {sp.ring}×{sp.ulysses} (ring × ulysses, {sp.layout})" if dims.sp > 1 else ""
    sp_text += f", tp {dims.tp}" if dims.tp > 1 else ""
    if dims.pp > 1:
        stages = f" × {recipe.parallel.stages_per_rank} stages" if recipe.parallel.stages_per_rank > 1 else ""
        sp_text += f", pp {dims.pp}{stages} ({recipe.parallel.pp_schedule})"
    logger.message(f"world {world} (dp {dp}{sp_text}), backend {recipe.parallel.backend}, device {device.type}, "
                   f"{tr.global_batch_size} rows × {tr.seq_len} tokens per step, "
                   f"{batches.grad_accum} micro-batch(es) of {tr.micro_batch_size} per rank")

    backend.train_mode()
    # Under pipeline parallelism the last stage computes the loss: its ranks report loss and tokens.
    reports = dims.coordinate(rank, "pp") == dims.pp - 1
    last = None
    for step in range(start_step, tr.max_steps):
        started = time.perf_counter()
        micro = [run.model_inputs(mb) for mb in batches.for_step(step)]
        local_tokens = sum(real for _, _, real in micro)
        count, = all_reduce_sum([sum(int((labels != IGNORE_INDEX).sum()) for _, labels, _ in micro)], device)
        # Every tp rank and pipeline stage of a replica holds the same rows: the world sum counts them
        # tp × pp times.
        count /= dims.tp * dims.pp
        lr = backend.lr
        scale = backend.loss_multiplier / max(count, 1.0)
        if dims.pp > 1:
            # The schedule runs forward and backward of every micro-batch through the stages.
            with activation_offload(recipe.memory.offload.activations):
                local_loss = backend.pipeline_step([StageInputs(inputs, labels) for inputs, labels, _ in micro],
                                                   token_loss_sum, scale)
        else:
            local_loss = 0.0
            for i, (inputs, labels, _) in enumerate(micro):
                # Tiled loss: the model's lm_head returns the loss sum itself, computed in chunks (tiling.py).
                tiled = recipe.memory.tiled_loss
                with (activation_offload(recipe.memory.offload.activations),
                      lm_head_computes_loss(labels if tiled else None, token_loss_sum)):
                    out = backend.forward(**inputs)
                loss_sum = out if tiled else token_loss_sum(out, labels)
                backend.backward(loss_sum * scale, last_micro_batch=i == len(micro) - 1)
                local_loss += loss_sum.item()
        grad_norm = backend.step()
        reported = [local_loss, float(local_tokens)] if reports else [0.0, 0.0]
        loss_total, tokens = (v / dims.tp for v in all_reduce_sum(reported, device))
        elapsed = time.perf_counter() - started
        tokens_seen += int(tokens)
        if count == 0:
            log.warning("step %d has no counted tokens (every label is ignored): loss 0, no update",
                        step + 1)
        last = {
            "step": step + 1, "loss": loss_total / max(count, 1.0), "lr": lr, "grad_norm": grad_norm,
            "tokens": int(tokens), "tokens_seen": tokens_seen, "tokens_per_s": tokens / elapsed,
            "peak_mem_gib": all_reduce_max(peak_memory_gib(device), device), "step_time_s": elapsed,
        }
        logger.log_step(last)
        done = step + 1
        if done == tr.max_steps or (tr.save_every and done % tr.save_every == 0):
            save_checkpoint(run_dir, done, backend,
                            {"tokens_seen": tokens_seen, "data_position": done * tr.global_batch_size,
                             "layout": layout},
                            keep=tr.keep_checkpoints)

    if tr.export:
        state_dict = backend.full_state_dict()
        if rank == 0:
            out = export_hf_model(state_dict, config, tokenizer, run_dir / "model")
            logger.message(f"exported {out}")
        barrier()
    logger.close()
    if last is not None:
        logger.message(f"done: {last['step']} steps, last loss {last['loss']:.4f}, "
                       f"{last['tokens_per_s']:.0f} tokens/s, peak {last['peak_mem_gib']:.2f} GiB/rank; "
                       f"run dir {run_dir}")
    return run_dir
