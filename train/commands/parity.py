"""`longtune parity RECIPE [overrides]`: compare the recipe's parallel layout with one process (train/parity.py),
on the recipe's processes (started under torchrun when no launcher did). Exit code 0: PASS, 1: FAIL."""

from __future__ import annotations

import argparse

from longtune.parallel.dims import barrier

from ..launch import relaunch_under_torchrun, strip_launcher_args, torchrun_needed
from ..parity import check_parity
from ..recipe import RecipeError, load_recipe
from . import command_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtune parity", description="`longtune parity RECIPE`: does the recipe's "
                                "parallel layout compute what one process computes?")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides (model.dtype=bfloat16: both sides bf16)")
    p.add_argument("--steps", type=int, default=2, help="how many first steps' batches to check (default 2)")
    p.add_argument("--tol", type=float, default=None,
                   help="pass when the layout's relative error against the float64 run is at most this; default: "
                        "a multiple of the 1-process error (8 × + 1e-6 in float32, 2 × + 1e-3 in bfloat16)")
    return p


def parity_recipe(recipe_arg: str, overrides: list[str]):
    """The recipe `longtune parity` checks, refused where its whole-model comparison cannot run."""
    recipe = load_recipe(recipe_arg, overrides)
    if recipe.parallel.pp > 1:
        # Each pipeline rank holds other parameters; the pp tests compare loss curves and exports instead.
        raise RecipeError(f"longtune parity compares whole-model gradients: parallel.pp {recipe.parallel.pp} "
                          "is not supported (compare `longtune train` loss curves instead)")
    if recipe.extension.pose.chunks:
        # The 1-process reference runs transformers' attention, which would cut every PoSE skip.
        raise RecipeError("longtune parity's reference uses transformers' attention, which reads PoSE's "
                          "position skips as document starts: run it without extension.pose")
    return recipe


@command_main
def main(argv: list[str]) -> int:
    """Entry of `longtune parity` (re-launches under torchrun) and of each rank."""
    argv = strip_launcher_args(argv)
    args = build_parser().parse_args(argv)
    recipe = parity_recipe(args.recipe, args.overrides)
    nproc = recipe.process_count()
    if torchrun_needed(nproc):
        return relaunch_under_torchrun(nproc, "longtune.train.commands.parity", argv)
    results = check_parity(recipe, args.steps, args.tol)
    barrier()  # under a launcher: rank 0 has printed the table
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":  # a rank of `longtune parity`
    raise SystemExit(main())
