"""What a run produces: the output columns, one row's result, the run's counters and outcome.

``OUTPUT_SCHEMA`` is the contract of every output table (README, "Output columns"); the pool
fills one ``RowResult`` per input row and ``RunStats`` as rows finish.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import polars as pl

from batchgen.api.types import Disposition, Reply
from batchgen.client import CallOutcome
from batchgen.errors import ExitCode, FatalAPIError, UsageError
from batchgen.images import IMAGE_NOT_FOUND
from batchgen.journal import Entry
from batchgen.ratelimit import Pacing

OUTPUT_SCHEMA: dict[str, pl.DataType] = {
    "reply": pl.String(),
    "reply_json_valid": pl.Boolean(),
    "reasoning": pl.String(),
    "finish_reason": pl.String(),
    "request_id": pl.String(),
    "input_tokens": pl.Int64(),
    "output_tokens": pl.Int64(),
    "total_tokens": pl.Int64(),
    "cached_tokens": pl.Int64(),
    "reasoning_tokens": pl.Int64(),
    "model": pl.String(),
    "status": pl.String(),
    "error_code": pl.String(),
    "error_message": pl.String(),
    "http_status": pl.Int64(),
    "attempts": pl.Int64(),
    "latency_ms": pl.Float64(),
    "billing_mode": pl.String(),
    "batch_id": pl.String(),
    "finished_at": pl.Datetime("us", "UTC"),
}
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA)

OK, ERROR, SKIPPED = "ok", "error", "skipped"
PENDING = "pending"  # in a batch that has not ended (batch mode): run again later
ONLINE = "online"  # the billing_mode of a row answered by a real-time call


@dataclass(slots=True)
class RowResult:
    """One row's output columns (everything after the input columns)."""

    status: str
    model: str | None = None
    reply: str | None = None
    reply_json_valid: bool | None = None  # JSON mode only: the reply parses (and fits the schema)
    reasoning: str | None = None
    finish_reason: str | None = None
    request_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    attempts: int | None = None
    latency_ms: float | None = None
    billing_mode: str | None = None  # "online" or "batch": the price the row was billed at
    batch_id: str | None = None  # the batch that answered the row, or holds it (batch mode)
    finished_at: datetime | None = None


@dataclass
class RunStats:
    """Live counters, read by the progress display and the final summary."""

    total: int
    started: float = field(default_factory=time.monotonic)
    ok: int = 0
    error: int = 0
    skipped: int = 0
    pending: int = 0  # rows in a batch that has not ended (batch mode)
    resumed: int = 0  # rows taken from the journal instead of being sent again
    changed: int = 0  # journalled rows sent again because their request changed
    input_tokens: int = 0  # every row of the output, resumed ones included
    output_tokens: int = 0
    sent_input_tokens: int = 0  # this run's requests only
    sent_output_tokens: int = 0
    cut_streams: int = 0  # rows with streamed attempts cut before their end (billed anyway)
    cut_output_tokens: int = 0  # what those cut attempts had generated, in sent_* and spent
    attempts: int = 0
    error_codes: Counter[str] = field(default_factory=Counter)
    finished: float | None = None
    spent: Decimal = Decimal(0)  # cost of the rows this run answered (priced models)
    cost: Decimal = Decimal(0)  # cost of every row in the output, resumed ones included
    unpriced_rows: int = 0  # rows with usage whose model has no price
    priced: bool = False  # whether a price table was given at all
    governor: Pacing | None = field(default=None, repr=False)  # the admitted rate, live

    @property
    def done(self) -> int:
        return self.ok + self.error + self.skipped + self.pending

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def add_cost(self, cost: Decimal | None, *, resumed: bool) -> None:
        if cost is None:
            self.unpriced_rows += 1
            return
        self.cost += cost
        if not resumed:
            self.spent += cost

    def add(self, result: RowResult, *, resumed: bool = False) -> None:
        if result.status == OK:
            self.ok += 1
        elif result.status == ERROR:
            self.error += 1
        elif result.status == PENDING:
            self.pending += 1
        else:
            self.skipped += 1
        if result.error_code and result.status == ERROR:
            self.error_codes[result.error_code] += 1
        self.input_tokens += result.input_tokens or 0
        self.output_tokens += result.output_tokens or 0
        if resumed:
            self.resumed += 1
        else:
            self.attempts += result.attempts or 0
            self.sent_input_tokens += result.input_tokens or 0
            self.sent_output_tokens += result.output_tokens or 0


@dataclass
class RunResult:
    """What a run produced: the output table, its counters, and why it stopped early if it did."""

    frame: pl.DataFrame | None  # None when the rows went to a writer (``arun_batches``)
    stats: RunStats
    fatal: FatalAPIError | None = None
    stopped: str | None = None  # RunControl's reason, when the run was stopped from outside


def check_collisions(columns: list[str]) -> None:
    clashes = [c for c in columns if c in OUTPUT_SCHEMA]
    if clashes:
        raise UsageError(
            f"input column {clashes[0]!r} has the name of an output column: rename it "
            f"(output columns: {', '.join(OUTPUT_COLUMNS)})"
        )


def utc_now() -> datetime:
    return datetime.now(UTC)


def answered(
    r: Reply, model: str, check_json: Callable[[str | None], bool] | None, *, http_status: int | None,
    attempts: int, latency_ms: float | None = None, billing_mode: str = ONLINE, batch_id: str | None = None,
) -> RowResult:  # fmt: skip
    """An answered row's output columns (a real-time reply, or a batch's result line)."""
    return RowResult(
        status=OK,
        model=model,
        reply=r.content,
        reply_json_valid=check_json(r.content) if check_json is not None else None,
        reasoning=r.reasoning,
        finish_reason=r.finish_reason,
        request_id=r.request_id,
        input_tokens=r.input_tokens,
        output_tokens=r.output_tokens,
        total_tokens=r.total_tokens,
        cached_tokens=r.cached_tokens,
        reasoning_tokens=r.reasoning_tokens,
        http_status=http_status,
        attempts=attempts,
        latency_ms=latency_ms,
        billing_mode=billing_mode,
        batch_id=batch_id,
        finished_at=utc_now(),
    )


def result_of(
    outcome: CallOutcome, model: str, check_json: Callable[[str | None], bool] | None = None
) -> tuple[RowResult, bool]:
    """The row's output columns, and whether that outcome is final (sending again would repeat it)."""
    if outcome.reply is not None:
        return answered(
            outcome.reply, model, check_json, http_status=outcome.http_status, attempts=outcome.attempts,
            latency_ms=outcome.latency_ms,
        ), True  # fmt: skip
    error = outcome.error
    if error is None:  # the run stopped before this row's first attempt
        return RowResult(status=SKIPPED, model=model, attempts=0), False
    message = error.message
    final = False
    if outcome.gave_up:
        status = ERROR
        plural = "s" if outcome.attempts != 1 else ""
        message = f"gave up after {outcome.attempts} attempt{plural}: {message}"
    elif error.disposition is Disposition.RETRY:
        status = SKIPPED  # the run stopped while this row waited to be retried
        message = f"not finished, the run stopped; last attempt: {message}"
    else:
        status = ERROR
        # A file that could not be read when the row was sent may be back next run.
        final = error.disposition is Disposition.ROW_ERROR and error.code != IMAGE_NOT_FOUND
    return RowResult(
        status=status,
        model=model,
        request_id=error.request_id,
        error_code=error.code,
        error_message=message,
        http_status=outcome.http_status,
        attempts=outcome.attempts,
        latency_ms=outcome.latency_ms,
        billing_mode=ONLINE,
        finished_at=utc_now(),
    ), final


def results_frame(results: list[RowResult]) -> pl.DataFrame:
    columns = {name: [getattr(r, name) for r in results] for name in OUTPUT_COLUMNS}
    return pl.DataFrame(columns, schema=OUTPUT_SCHEMA)


def from_journal(entry: Entry) -> RowResult:
    """A journalled row's result as it was written."""
    values = dict(entry.result)
    if values.get("finished_at"):
        values["finished_at"] = datetime.fromisoformat(values["finished_at"])
    return RowResult(**{k: v for k, v in values.items() if k in RowResult.__dataclass_fields__})


# Why a run stopped early (``RunControl.reason``) -> the exit code that says so.
STOP_EXIT_CODES = {"SIGINT": ExitCode.SIGINT, "SIGTERM": ExitCode.SIGTERM, "budget": ExitCode.BUDGET}


def exit_code(result: RunResult) -> int:
    if result.fatal is not None:
        return result.fatal.exit_code
    if result.stopped is not None:
        return STOP_EXIT_CODES.get(result.stopped, ExitCode.ABORTED)
    if result.stats.pending:
        return ExitCode.BATCH_PENDING
    return ExitCode.OK if result.stats.error == 0 and result.stats.skipped == 0 else ExitCode.ROW_ERRORS
