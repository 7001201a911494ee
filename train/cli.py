"""The `longtune` command: a registry of subcommands, each a module of `longtune.train.commands`.

`longtune NAME ARGS...` imports the command's module and returns `main(ARGS)`; that module parses its own
arguments and reports its own errors (`commands.command_main`). This file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import offline_environment, quiet_cpu_environment

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("longtune.train.commands.train", "train from a recipe (a path or a shipped recipe name)"),
    "demo": ("longtune.train.commands.demo",
             "the main job: prep → extend (PI, YaRN; sp = 2) → evaluate → comparison"),
    "prep": ("longtune.train.commands.prep", "build a packed long-document corpus from a prep config"),
    "eval": ("longtune.train.commands.eval", "long-context evaluation: passkey, needle, perplexity vs length"),
    "longrope-search": ("longtune.train.commands.longrope_search", "evolutionary search of LongRoPE rescale factors"),
    "plan": ("longtune.train.commands.plan",
             "which parallel layouts fit a model at a length, ranked by estimated tokens/s"),
    "parity": ("longtune.train.commands.parity",
               "compare a recipe's parallel layout with one process (loss, gradients)"),
    "selftest": ("longtune.train.commands.selftest",
                 "check this machine's parallel stack (every sp layout and kernel, tp, pp, tiling) against 1 process"),
    "recipes": ("longtune.train.commands.recipes",
                "list the shipped recipes and prep/accelerate/deepspeed configs"),
}
"""`longtune NAME ...` → (the module whose `main(argv) -> int` runs it, its one-line help)."""


def build_parser() -> argparse.ArgumentParser:
    """`longtune --help` and the usage errors of a missing or unknown command."""
    parser = argparse.ArgumentParser(prog="longtune", description="Long-sequence fine-tuning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, what) in COMMANDS.items():
        sub.add_parser(name, help=what, add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    return parser


def run_command(name: str, argv: list[str]) -> int:
    return importlib.import_module(COMMANDS[name][0]).main(argv)


def main(argv: list[str] | None = None) -> int:
    offline_environment()
    quiet_cpu_environment()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # the command's own parser takes every argument, options first included
        return run_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(args.command, args.args)


if __name__ == "__main__":
    sys.exit(main())
