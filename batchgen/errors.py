"""Errors batchgen raises, each carrying the exit code the CLI reports.

    BatchgenError             base class; ``exit_code`` and a one-line message a user can act on
    ├── UsageError            exit 2: bad options, unreadable or invalid input, no API key
    └── FatalAPIError         exit 1: the service refused the whole run (key, billing, access,
                              unknown model, wrong route); ``result`` holds the partial run

Row-level failures (moderation, a bad parameter for one row, retries exhausted) are not
exceptions at the library boundary: they are written into that row's ``status`` /
``error_code`` / ``error_message`` columns and the run goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchgen.runner import RunResult

EXIT_OK = 0
EXIT_ABORTED = 1
EXIT_USAGE = 2
EXIT_ROW_ERRORS = 3


class BatchgenError(Exception):
    """Base class: ``str(err)`` is the whole one-line message."""

    exit_code = EXIT_ABORTED


class UsageError(BatchgenError):
    """The command, its options or its input cannot work; nothing was sent."""

    exit_code = EXIT_USAGE


class FatalAPIError(BatchgenError):
    """DashScope refused in a way no other row can succeed after (bad key, arrears, ...)."""

    exit_code = EXIT_ABORTED

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        result: RunResult | Any = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.result = result
