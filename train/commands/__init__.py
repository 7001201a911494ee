"""The `longtune` subcommands, one module each (`longtune NAME ...` runs `longtune.train.commands.NAME.main`).

A command module parses its arguments, calls the library and raises `UserError` for bad input;
`command_main` turns its body into `main(argv) -> int` and is the one place where a `UserError` becomes
the `longtune: error: <message>` line and its exit code. Command modules never import `longtune.train.cli`
(the dispatcher imports them), and the library never imports them (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

from longtune.data_prep.user_error import UserError

from ..launch import leave

Body = Callable[[list[str]], int]


def command_main(body: Body | None = None, *, rank_zero_reports: bool = False):
    """`main(argv=None) -> int` for a command whose work is `body(argv) -> exit code`: a `UserError` is
    printed as one `longtune: error:` line and its `exit_code` returned; under a launcher the rank leaves
    through `launch.leave`. `rank_zero_reports`: only rank 0 prints (every rank meets the same bad input).
    Use as `@command_main` or `@command_main(rank_zero_reports=True)`."""
    if body is None:
        return functools.partial(command_main, rank_zero_reports=rank_zero_reports)

    @functools.wraps(body)
    def main(argv: list[str] | None = None) -> int:
        try:
            code = body(sys.argv[1:] if argv is None else list(argv))
        except UserError as exc:
            if not rank_zero_reports or int(os.environ.get("RANK", "0")) == 0:
                print(f"longtune: error: {exc}", file=sys.stderr, flush=True)
            code = exc.exit_code
        return leave(code)

    return main


def error_raising_parser(error: type[UserError], **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose usage errors raise `error`, so they end like every other bad input: one
    `longtune: error:` line and exit code 2 (argparse's own would print the usage and its own prefix)."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise error(message)

    return _Parser(**kwargs)


def offline_environment() -> None:
    """longtune never downloads: the Hugging Face libraries are switched offline in this process (and the
    ranks it launches inherit it), unless the user set these variables themselves."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")


def quiet_cpu_environment() -> None:
    """Pin DeepSpeed's accelerator to the CPU on machines without CUDA (it warns when it guesses)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
