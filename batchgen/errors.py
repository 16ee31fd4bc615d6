"""Errors batchgen raises, each carrying the exit code the CLI reports, and those codes.

    BatchgenError             base class; ``exit_code`` and a one-line message a user can act on
    ├── UsageError            exit 2: bad options, unreadable or invalid input, no API key
    └── FatalAPIError         exit 1: the service refused the whole run (key, billing, access,
                              unknown model, wrong route); ``result`` holds the partial run

Row-level failures (moderation, a bad parameter for one row, retries exhausted) are not
exceptions at the library boundary: they are written into that row's ``status`` /
``error_code`` / ``error_message`` columns and the run goes on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class ExitCode(enum.IntEnum):
    """Every exit code ``batchgen`` documents (README, "Exit codes"), in one place."""

    OK = 0  # every row ok
    ABORTED = 1  # stopped on a fatal answer, or could not write the output
    USAGE = 2  # bad options or input: nothing sent
    ROW_ERRORS = 3  # finished, some rows are errors or skipped
    LOCKED = 4  # another run holds the output
    BUDGET = 5  # stopped by --max-cost
    BATCH_PENDING = 6  # batch mode: rows wait in batches still running, nothing lost: run again later
    SIGINT = 130  # stopped by Ctrl-C
    SIGTERM = 143  # stopped by SIGTERM


@dataclass(frozen=True, slots=True)
class RowProblem:
    """Why a row will not be sent (an empty prompt, a missing image, ...): a value, not an
    exception; it becomes the row's ``error_code`` and ``error_message``."""

    code: str
    message: str


class BatchgenError(Exception):
    """Base class: ``str(err)`` is the whole one-line message."""

    exit_code: int = ExitCode.ABORTED


class UsageError(BatchgenError):
    """The command, its options or its input cannot work; nothing was sent."""

    exit_code = ExitCode.USAGE


class FatalAPIError(BatchgenError):
    """DashScope refused in a way no other row can succeed after (bad key, arrears, ...)."""

    exit_code = ExitCode.ABORTED

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        result: Any = None,  # the run's RunResult (batchgen.results), set when it stops
    ) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.result = result
