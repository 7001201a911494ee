"""One run per run dir, and a clean state before it starts.

`prepare_run_dir(recipe)` runs in the one process that owns the run: the `longtune train` process that
launches the ranks (it tells them through `PREPARED_ENV`), or rank 0 when a launcher (torchrun,
accelerate, deepspeed) started the ranks itself. Before any rank looks at the dir it

1. takes an exclusive `flock` on `train.output_dir/.lock`, held for the life of the process: a second run
   on the same dir is refused with one error line;
2. refuses `train.resume=false` on a dir that already holds a run (checkpoints or metrics), which would
   mix two runs, unless `train.overwrite=true`, which removes the old run's checkpoints, metrics and model;
3. removes stale `step_N.partial/` (a save that died) and `step_N.corrupt/` dirs;
4. with `train.resume`, verifies the newest checkpoint against its manifest and moves corrupt ones aside
   (`checkpoint.set_aside_corrupt_checkpoints`), so every rank then finds the same good checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

from longtune.data_prep.user_error import UserError

from .checkpoint import checkpoint_root, remove_stale_checkpoint_dirs, set_aside_corrupt_checkpoints

LOCK_FILE = ".lock"
PREPARED_ENV = "LONGTUNE_PREPARED_RUN_DIR"
RUN_FILES = ("metrics.jsonl", "stage.json")
RUN_DIRS = ("checkpoints", "model", "model.partial")

_held: list = []
"""Open lock files: the lock lasts as long as this process."""


class RunDirError(UserError, RuntimeError):
    """A run dir this run may not use."""


def lock_run_dir(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    fh = open(output_dir / LOCK_FILE, "a+")  # noqa: SIM115 (kept open: the lock lasts as long as it is)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        raise RunDirError(f"train.output_dir {output_dir} is in use by another run"
                          f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to end or use another "
                          "train.output_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _held.append(fh)


def run_dirs(recipe) -> list[Path]:
    """The dirs the recipe trains in: train.output_dir, or one sub-dir per stage."""
    if recipe.stages:
        return [Path(recipe.stage_recipe(i).train.output_dir) for i in range(len(recipe.stages))]
    return [Path(recipe.train.output_dir)]


def holds_a_run(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return True
    root = checkpoint_root(run_dir)
    return root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir())


def _stage_complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "stage.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def clear_run(run_dir: Path) -> None:
    """Remove a run's checkpoints first (without them nothing resumes from the rest), then metrics and model."""
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def prepare_run_dir(recipe) -> None:
    top = Path(recipe.train.output_dir)
    lock_run_dir(top)
    tr = recipe.train
    held = [d for d in run_dirs(recipe) if holds_a_run(d)]
    if held and tr.overwrite:
        for run_dir in held:
            clear_run(run_dir)
        print(f"longtune: train.overwrite: removed the previous run's checkpoints, metrics and model in "
              f"{', '.join(map(str, held))}", file=sys.stderr, flush=True)
    elif held and not tr.resume:
        raise RunDirError(f"train.output_dir {held[0]} already holds a run (checkpoints or metrics.jsonl); "
                          "train.resume=false would mix two runs: set train.overwrite=true to replace it, "
                          "train.resume=true to continue it, or use another train.output_dir")
    for run_dir in run_dirs(recipe):
        remove_stale_checkpoint_dirs(run_dir)
        if tr.resume and not _stage_complete(run_dir):
            set_aside_corrupt_checkpoints(run_dir)
    os.environ[PREPARED_ENV] = str(top.resolve())


def prepared_here(recipe) -> bool:
    """Whether the process that launched this one has already prepared (and locked) the run dir."""
    return os.environ.get(PREPARED_ENV) == str(Path(recipe.train.output_dir).resolve())
