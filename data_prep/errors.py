"""The one error type of data preparation: a problem with the user's config or input data."""

from __future__ import annotations

from .user_error import UserError


class PrepError(UserError, ValueError):
    """Bad config or bad input; the CLI prints it as one `longtune: error:` line (exit code 2)."""
