"""`longtune train RECIPE [key.sub=value ...]` and the entry of one rank, `python -m longtune.train RECIPE`.

`longtune train` validates everything it can before heavy work and, when the recipe asks for several
processes and no launcher started this one, re-launches itself under torchrun (`launch.py`). The rank
entry is what torchrun, `accelerate launch` and `deepspeed --module` run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from longtune.data_prep.user_error import EXIT_USAGE

from ..launch import launched, relaunch_under_torchrun, strip_launcher_args, torchrun_needed
from . import command_main, offline_environment, quiet_cpu_environment


def preflight(recipe, check_resume: bool = True) -> None:
    """Cheap checks of everything the recipe points at, before any process starts. `check_resume`: also
    the layout of the checkpoint a resume would start from (only once the run dir is prepared, see rundir.py)."""
    from ..model import resolve_model_source
    from ..recipe import RecipeError
    from ..tokenizer import check_tokenizer_source

    resolve_model_source(recipe.model.name_or_path)
    check_tokenizer_source(recipe.model.tokenizer)
    for data_path in {r.data.path for r in [recipe, *map(recipe.stage_recipe, range(len(recipe.stages)))]}:
        if data_path is not None and not Path(data_path).is_dir():
            raise RecipeError(f"data.path {data_path!r} is not a directory (expected the output of "
                              "`longtune prep`)")
    ds_config = recipe.parallel.deepspeed.config
    if recipe.parallel.backend == "deepspeed" and ds_config and not Path(ds_config).is_file():
        raise RecipeError(f"parallel.deepspeed.config {ds_config!r} does not exist")
    # The model's files and the layout rules that need its config (heads, layers, head_dim), as the workers
    # apply them: one error line here instead of one traceback per rank.
    from ..model_checks import preflight_model

    first = recipe.stage_recipe(0) if recipe.stages else recipe
    preflight_model(recipe, int(os.environ.get("WORLD_SIZE", first.process_count())))
    if check_resume:
        check_resume_layout(recipe)


def check_resume_layout(recipe) -> None:
    from ..checkpoint import check_resumable, checkpoint_layout, latest_checkpoint

    found = latest_checkpoint(Path(recipe.train.output_dir)) if recipe.train.resume else None
    if found is not None:
        world = int(os.environ.get("WORLD_SIZE", recipe.process_count()))
        check_resumable(found[1], checkpoint_layout(recipe, world))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtune train", description="Train from a recipe.")
    p.add_argument("recipe", help="recipe YAML path or shipped name (e.g. tiny-smoke)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    return p


@command_main
def main(argv: list[str]) -> int:
    """`longtune train`: validate, prepare the run dir, then train here or on the recipe's processes."""
    from ..recipe import load_recipe
    from ..rundir import prepare_run_dir

    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    preflight(recipe, check_resume=False)
    if not launched():  # this process owns the run dir (and its lock) for the run's life
        prepare_run_dir(recipe)
        check_resume_layout(recipe)
    nproc = (recipe.stage_recipe(0) if recipe.stages else recipe).process_count()  # stages share one launch
    if torchrun_needed(nproc):
        return relaunch_under_torchrun(nproc, "longtune.train", [args.recipe, *args.overrides])
    return run_rank([args.recipe, *args.overrides])


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def run_rank(argv: list[str]) -> int:
    """One rank's training (or the only process's): preflight, the run dir on rank 0, then the run."""
    argv = strip_launcher_args(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m longtune.train RECIPE [section.key=value ...]", file=sys.stderr)
        return EXIT_USAGE if not argv else 0
    rank = int(os.environ.get("RANK", "0"))
    offline_environment()
    quiet_cpu_environment()
    _configure_logging(rank)
    from longtune.parallel.dims import launched_world

    from ..loop import run_training
    from ..recipe import load_recipe
    from ..rundir import prepare_run_dir, prepared_here

    recipe = load_recipe(argv[0], argv[1:])
    if prepared_here(recipe):
        preflight(recipe)
    else:  # started by a launcher: rank 0 owns the run dir; the other ranks wait for it in the rendezvous
        preflight(recipe, check_resume=False)
        (recipe.stage_recipe(0) if recipe.stages else recipe).data_parallel_size(launched_world()[2])
        if rank == 0:
            prepare_run_dir(recipe)
            check_resume_layout(recipe)
    if recipe.stages:
        from ..stages import run_stages

        run_stages(recipe)
    else:
        run_training(recipe)
    return 0


rank_main = command_main(run_rank)
"""`python -m longtune.train RECIPE [overrides]` (train/__main__.py): one rank, for torchrun / accelerate /
deepspeed."""
