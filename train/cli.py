"""The `longtune` command: `train`, `prep`, `eval`, `plan`, `parity`, each a thin layer over the library.

`longtune train RECIPE [key.sub=value ...]` validates everything it can before heavy work and, when
the recipe asks for several processes and no launcher started this one, re-launches itself under
torchrun. `python -m longtune.train RECIPE` is the per-rank entry that torchrun, `accelerate launch`
and `deepspeed --module` run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

EXIT_USAGE = 2

DELEGATED = {
    "demo": ("longtune.train.demo", "the main job: prep → extend (PI, YaRN; sp = 2) → evaluate → comparison"),
    "prep": ("longtune.data_prep.cli", "build a packed long-document corpus from a prep config"),
    "eval": ("longtune.train.evaluate.cli", "long-context evaluation: passkey, needle, perplexity vs length"),
    "longrope-search": ("longtune.train.longrope", "evolutionary search of LongRoPE rescale factors"),
    "plan": ("longtune.train.plan", "which parallel layouts fit a model at a length, ranked by estimated tokens/s"),
    "parity": ("longtune.train.parity", "compare a recipe's parallel layout with one process (loss, gradients)"),
}
"""Subcommands with their own argument parser: `longtune NAME ...` calls `MODULE.main(argv)`."""


def error_raising_parser(error: type[Exception], **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose usage errors raise `error`, which the subcommand reports as one
    `longtune: error:` line with exit code 2, like every longtune error."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise error(message)

    return _Parser(**kwargs)


def _fail(message: str) -> int:
    print(f"longtune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def preflight(recipe, check_resume: bool = True) -> None:
    """Cheap checks of everything the recipe points at, before any process starts. `check_resume`: also
    the layout of the checkpoint a resume would start from (only once the run dir is prepared, see rundir.py)."""
    from .model import resolve_model_source
    from .recipe import RecipeError
    from .tokenizer import check_tokenizer_source

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
    from .run_setup import preflight_model

    first = recipe.stage_recipe(0) if recipe.stages else recipe
    preflight_model(recipe, int(os.environ.get("WORLD_SIZE", first.process_count())))
    if check_resume:
        check_resume_layout(recipe)


def check_resume_layout(recipe) -> None:
    from .checkpoint import check_resumable, checkpoint_layout, latest_checkpoint

    found = latest_checkpoint(Path(recipe.train.output_dir)) if recipe.train.resume else None
    if found is not None:
        world = int(os.environ.get("WORLD_SIZE", recipe.process_count()))
        check_resumable(found[1], checkpoint_layout(recipe, world))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch_under_torchrun(nproc: int, argv: list[str], module: str = "longtune.train") -> int:
    """Run `module` on `nproc` processes under torchrun; a signal to this process stops all of them
    (`launch.run_child`) and ends in one error line and exit code 128 + signal."""
    from .launch import ChildInterrupted, run_child

    # torchrun (`launch.torchrun_main`: the same, without a Python traceback when it is stopped)
    cmd = [sys.executable, "-m", "longtune.train.launch", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", module, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"longtune: starting {nproc} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    try:
        code = run_child(cmd, env)
    except ChildInterrupted as exc:
        print(f"longtune: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    if code > 128 and code - 128 in {int(s) for s in signal.Signals}:  # torchrun itself was signalled
        print(f"longtune: error: torchrun was stopped by {signal.Signals(code - 128).name}; every process it "
              "started has exited", file=sys.stderr, flush=True)
    return code


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .rundir import prepare_run_dir

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        preflight(recipe, check_resume=False)
        if "WORLD_SIZE" not in os.environ:  # this process owns the run dir (and its lock) for the run's life
            prepare_run_dir(recipe)
            check_resume_layout(recipe)
    except Exception as exc:
        if not getattr(exc, "user_facing", False):
            raise
        return _fail(str(exc))
    nproc = (recipe.stage_recipe(0) if recipe.stages else recipe).process_count()  # stages share one launch
    if "WORLD_SIZE" not in os.environ and nproc > 1:
        return relaunch_under_torchrun(nproc, [args.recipe, *args.overrides])
    return worker_main([args.recipe, *args.overrides], exit_hard=False)


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N`, which the deepspeed launcher appends."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def worker_main(argv: list[str] | None = None, exit_hard: bool = True) -> int:
    """Entry of one rank (`python -m longtune.train RECIPE [overrides]`)."""
    argv = _strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m longtune.train RECIPE [section.key=value ...]", file=sys.stderr)
        return EXIT_USAGE if not argv else 0
    rank = int(os.environ.get("RANK", "0"))
    offline_environment()
    _quiet_cpu_environment()
    _configure_logging(rank)
    from longtune.parallel.dims import launched_world

    from .loop import run_training
    from .recipe import load_recipe
    from .rundir import prepare_run_dir, prepared_here

    try:
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
            from .stages import run_stages

            run_stages(recipe)
        else:
            run_training(recipe)
        code = 0
    except Exception as exc:
        if not getattr(exc, "user_facing", False):
            raise
        code = _fail(str(exc))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and exit_hard:
        # gloo + DDP can abort at interpreter exit after a successful run ("terminate called
        # without an active exception"); leave without running the C++ destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _delegate(module_name: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module_name).main(args.args)
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtune", description="Long-sequence fine-tuning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a recipe (a path or a shipped recipe name)")
    train.add_argument("recipe", help="recipe YAML path or shipped name (e.g. tiny-smoke)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    train.set_defaults(func=cmd_train)
    for name, (module, what) in DELEGATED.items():
        p = sub.add_parser(name, help=what, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module))
    recipes = sub.add_parser("recipes", help="list the shipped recipes and prep/accelerate/deepspeed configs")
    recipes.set_defaults(func=cmd_recipes)
    return parser


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipe import RECIPES_DIR, shipped_recipes

    for name in shipped_recipes():
        print(f"{name:28s} {RECIPES_DIR / (name + '.yaml')}")
    for what, pattern in (("prep configs (longtune prep NAME)", "prep/*.yaml"),
                          ("accelerate configs", "accelerate/*.yaml"), ("deepspeed configs", "deepspeed/*.json")):
        print(f"\n{what}:")
        for path in sorted(RECIPES_DIR.glob(pattern)):
            print(f"{path.stem:28s} {path}")
    return 0


def _quiet_cpu_environment() -> None:
    """Pin DeepSpeed's accelerator to the CPU on machines without CUDA (it warns when it guesses)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def offline_environment() -> None:
    """longtune never downloads: the Hugging Face libraries are switched offline in this process (and the
    ranks it launches inherit it), unless the user set these variables themselves."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")


def main(argv: list[str] | None = None) -> int:
    offline_environment()
    _quiet_cpu_environment()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:  # their own parsers take every argument, options first included
        return _delegate(DELEGATED[argv[0]][0])(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
