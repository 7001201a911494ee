"""`UserError`: the base of every error that is the user's to fix (a bad recipe, config, path or argument).

A `longtune` command reports one as a single `longtune: error: <message>` line and exits with its
`exit_code`, without a traceback (`longtune.train.commands.command_main` is the one place that does).
It lives in data_prep/ because data_prep/ is the bottom layer: it imports neither train/ nor parallel/
(nor torch), so parallel/, data_prep/ and train/ can all subclass it without an import edge upward.
"""

from __future__ import annotations

EXIT_USAGE = 2
"""The exit code of bad usage or input (argparse's too)."""


class UserError(Exception):
    """Bad input from the user: reported as one error line, never as a traceback."""

    exit_code: int = EXIT_USAGE
    """The process's exit code when this error ends a command."""
