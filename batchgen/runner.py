"""The pipeline: a prompt table in, the same table with answers out.

``run_frame`` / ``arun_frame`` are the library entry points; the CLI is a thin layer over
them. Rows are sent by an asyncio pool of ``concurrency`` workers, paced smoothly at
``rpm`` requests per minute, and every input row comes back exactly once, in input order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import polars as pl
from aiolimiter import AsyncLimiter

from batchgen.budget import Budget, row_cost
from batchgen.client import Caller, CallOutcome, make_transport
from batchgen.config import RunConfig
from batchgen.errors import FatalAPIError, UsageError
from batchgen.journal import Entry, Journal, request_hash
from batchgen.pricing import PriceTable
from batchgen.prompts import PromptSpec, RowProblem, build_messages
from batchgen.protocol import APIError, Disposition, build_body, fatal_hint

if TYPE_CHECKING:
    import httpx

OUTPUT_SCHEMA: dict[str, pl.DataType] = {
    "reply": pl.String(),
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
    "finished_at": pl.Datetime("us", "UTC"),
}
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA)

OK, ERROR, SKIPPED = "ok", "error", "skipped"

log = logging.getLogger("batchgen")


@dataclass(slots=True)
class RowResult:
    """One row's output columns (everything after the input columns)."""

    status: str
    model: str | None = None
    reply: str | None = None
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
    finished_at: datetime | None = None


@dataclass
class RunStats:
    """Live counters, read by the progress display and the final summary."""

    total: int
    started: float = field(default_factory=time.monotonic)
    ok: int = 0
    error: int = 0
    skipped: int = 0
    resumed: int = 0  # rows taken from the journal instead of being sent again
    changed: int = 0  # journalled rows sent again because their request changed
    input_tokens: int = 0
    output_tokens: int = 0
    attempts: int = 0
    error_codes: Counter[str] = field(default_factory=Counter)
    finished: float | None = None
    spent: Decimal = Decimal(0)  # cost of the rows this run answered (priced models)
    cost: Decimal = Decimal(0)  # cost of every row in the output, resumed ones included
    unpriced_rows: int = 0  # rows with usage whose model has no price
    priced: bool = False  # whether a price table was given at all

    @property
    def done(self) -> int:
        return self.ok + self.error + self.skipped

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


class RunControl:
    """Stops a run from outside it: a signal handler, a budget, a notebook's cancel button.

    ``stop`` ends dispatching: rows not yet sent, or waiting to be retried, become ``skipped``
    while requests in flight may finish for ``grace`` seconds; ``stop_now`` (or the end of the
    grace) cancels those too. Either way every row is in the output and nothing finished is lost.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._grace_timer: asyncio.TimerHandle | None = None
        self._interrupt: Callable[[], None] | None = None

    @property
    def stopping(self) -> bool:
        return self.reason is not None

    def stop(self, reason: str, grace: float | None = None) -> None:
        if self.reason is None:
            self.reason = reason
        if self._interrupt is not None:
            self._interrupt()  # rows waiting for a pacing slot or a retry give up their turn now
        if grace is not None and self._grace_timer is None:
            self._grace_timer = asyncio.get_running_loop().call_later(grace, self.stop_now)

    def stop_now(self, reason: str | None = None) -> None:
        self.stop(reason or "stopped")
        for task in self._tasks:
            task.cancel()

    def _attach(self, tasks: list[asyncio.Task[None]], interrupt: Callable[[], None]) -> None:
        self._tasks = tasks
        self._interrupt = interrupt

    def _detach(self) -> None:
        self._tasks = []
        self._interrupt = None
        if self._grace_timer is not None:
            self._grace_timer.cancel()


@dataclass
class RunResult:
    """What a run produced: the output table, its counters, and why it stopped early if it did."""

    frame: pl.DataFrame
    stats: RunStats
    fatal: FatalAPIError | None = None
    stopped: str | None = None  # RunControl's reason, when the run was stopped from outside


def check_collisions(columns: list[str]) -> None:
    clashes = [c for c in columns if c in OUTPUT_SCHEMA]
    if clashes:
        raise UsageError(f"input column {clashes[0]!r} has the name of an output column: rename it "
                         f"(output columns: {', '.join(OUTPUT_COLUMNS)})")


def _now() -> datetime:
    return datetime.now(UTC)


def _result_of(outcome: CallOutcome, model: str) -> tuple[RowResult, bool]:
    """The row's output columns, and whether that outcome is final (sending again would repeat it)."""
    if outcome.reply is not None:
        r = outcome.reply
        return RowResult(
            status=OK, model=model, reply=r.content, reasoning=r.reasoning,
            finish_reason=r.finish_reason, request_id=r.request_id, input_tokens=r.input_tokens,
            output_tokens=r.output_tokens, total_tokens=r.total_tokens,
            cached_tokens=r.cached_tokens, reasoning_tokens=r.reasoning_tokens,
            http_status=outcome.http_status, attempts=outcome.attempts,
            latency_ms=outcome.latency_ms, finished_at=_now()), True
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
        final = error.disposition is Disposition.ROW_ERROR
    return RowResult(status=status, model=model, request_id=error.request_id,
                     error_code=error.code, error_message=message,
                     http_status=outcome.http_status, attempts=outcome.attempts,
                     latency_ms=outcome.latency_ms, finished_at=_now()), final


def results_frame(results: list[RowResult]) -> pl.DataFrame:
    columns = {name: [getattr(r, name) for r in results] for name in OUTPUT_COLUMNS}
    return pl.DataFrame(columns, schema=OUTPUT_SCHEMA)


UNREACHABLE_CODES = frozenset({"batchgen.ConnectionError", "batchgen.Timeout"})
UNREACHABLE_ROWS = 5


def _unreachable(config: RunConfig, outcome: CallOutcome) -> APIError:
    """Rows one after another exhausting every attempt without a connection: stop paying time."""
    assert outcome.error is not None
    return APIError(None, "batchgen.Unreachable",
                    f"{UNREACHABLE_ROWS} rows in a row got no answer from {config.base_url} in "
                    f"{outcome.attempts} attempts each; last: {outcome.error.message}",
                    None, Disposition.FATAL)


def _from_journal(entry: Entry) -> RowResult:
    values = dict(entry.result)
    if values.get("finished_at"):
        values["finished_at"] = datetime.fromisoformat(values["finished_at"])
    return RowResult(**{k: v for k, v in values.items() if k in RowResult.__dataclass_fields__})


async def arun(frame: pl.DataFrame, config: RunConfig, spec: PromptSpec = PromptSpec(), *,
               keys: list[str] | None = None,
               raw_messages: list[Any] | None = None,
               journal: Journal | None = None,
               retry_errors: bool = False,
               control: RunControl | None = None,
               prices: PriceTable | None = None,
               budget: Budget | None = None,
               on_result: Callable[[int, RowResult], None] | None = None,
               progress: Callable[[RunStats], Awaitable[None]] | None = None,
               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
               transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Answer every row of ``frame``; never raises for API trouble, it reports it in ``RunResult``.

    With a ``journal`` (opened, locked), rows it already holds for the same request are taken
    from it instead of being sent (permanent row errors too, unless ``retry_errors``), and
    every row that finishes is recorded in it at once; ``keys`` name the rows (default: the
    row numbers). ``raw_messages`` are the messages cells as the file held them (JSONL).
    ``control`` stops the run from outside. With ``prices`` the stats carry the cost so far;
    a ``budget`` stops dispatching (reason ``"budget"``) before it could be overspent.
    ``on_result(index, result)`` is called as each row finishes; ``progress(stats)`` runs as a
    task for the length of the run.
    ``transport`` replaces the default aiohttp-backed httpx transport; the run closes it.
    """
    check_collisions(frame.columns)
    plan = build_messages(spec, frame, raw_messages)
    n = len(plan)
    keys = keys if keys is not None else [str(i) for i in range(n)]
    if len(keys) != n:
        raise UsageError(f"{len(keys)} row keys for {n} rows")
    control = control or RunControl()
    previous = journal.load() if journal is not None else {}
    results: list[RowResult | None] = [None] * n
    stats = RunStats(total=n)
    fatal: list[APIError] = []
    unreachable: list[APIError] = []  # rows in a row that never reached the service
    route = config.effective_route

    model_price = prices.lookup(config.model) if prices is not None else None
    stats.priced = prices is not None

    def finish(index: int, result: RowResult, *, resumed: bool = False) -> Decimal | None:
        results[index] = result
        stats.add(result, resumed=resumed)
        cost = None
        if prices is not None and result.status != SKIPPED:
            price = model_price if result.model == config.model else prices.lookup(result.model or "")
            cost = row_cost(price, result, prices.cached_ratio)
            stats.add_cost(cost, resumed=resumed)
        if on_result is not None:
            on_result(index, result)
        return cost

    to_send: list[tuple[int, dict[str, Any], str]] = []
    for index, item in enumerate(plan):
        if isinstance(item, RowProblem):
            finish(index, RowResult(status=ERROR, model=config.model, error_code=item.code,
                                    error_message=item.message, attempts=0, finished_at=_now()))
            continue
        body = build_body(config.model, item, config.parameters, route)
        digest = request_hash(body)
        entry = previous.get(keys[index])
        if entry is not None and entry.request_hash == digest:
            if entry.status == OK or (entry.final and not retry_errors):
                finish(index, _from_journal(entry), resumed=True)
                continue
        elif entry is not None:
            stats.changed += 1
        to_send.append((index, body, digest))
    if previous:
        log.info("resumed: %s done, %s to go%s", f"{stats.resumed:,}", f"{len(to_send):,}",
                 f" ({stats.changed:,} changed since the last run)" if stats.changed else "")

    # A leaky bucket one request deep: a request every 60/rpm seconds and never a burst, so no
    # 1-second window carries more than rpm/60 + 1 requests, the first second included.
    limiter = AsyncLimiter(1, 60.0 / config.rpm)
    queue = iter(to_send)

    async with transport or make_transport(config) as http:
        caller = Caller(config, http, acquire=limiter.acquire,
                        aborted=lambda: bool(fatal) or control.stopping, sleep=sleep)

        async def worker() -> None:
            for index, body, digest in queue:
                if fatal or control.stopping:
                    return  # the rows left become "skipped" below
                worst = Decimal(0)
                if budget is not None:
                    worst = budget.worst_case(config.model, body["input"]["messages"])
                    if not await budget.reserve(worst):
                        control.stop("budget")
                        return
                try:
                    outcome = await caller.call(body)
                except Exception as exc:  # a bug here must cost one row, not the run's answers
                    log.exception("unexpected error on row %s", keys[index])
                    outcome = CallOutcome(None, APIError(None, "batchgen.InternalError",
                                                         f"{type(exc).__name__}: {exc}", None,
                                                         Disposition.RETRY), 0, None, None,
                                          gave_up=True)
                if outcome.reply is not None:
                    unreachable.clear()
                elif outcome.gave_up and outcome.error is not None \
                        and outcome.error.code in UNREACHABLE_CODES:
                    unreachable.append(outcome.error)
                    if len(unreachable) == UNREACHABLE_ROWS:
                        fatal.append(_unreachable(config, outcome))
                if outcome.error is not None and outcome.error.disposition is Disposition.FATAL:
                    fatal.append(outcome.error)
                if fatal:
                    caller.interrupt()
                result, final = _result_of(outcome, config.model)
                if result.status != SKIPPED and journal is not None:
                    journal.record(keys[index], digest, final, result)
                cost = finish(index, result)
                if budget is not None:
                    await budget.settle(worst, cost)

        workers = [asyncio.create_task(worker())
                   for _ in range(min(config.concurrency, len(to_send)))]
        control._attach(workers, caller.interrupt)
        reporter = [asyncio.create_task(progress(stats))] if progress else []
        try:
            await asyncio.gather(*workers, return_exceptions=True)
        finally:
            control._detach()
            for task in [*workers, *reporter]:
                task.cancel()
            await asyncio.gather(*workers, *reporter, return_exceptions=True)
    for index, result in enumerate(results):
        if result is None:  # never sent, or cancelled in flight: accounted for, not lost
            finish(index, RowResult(status=SKIPPED, model=config.model, attempts=0))
    stats.finished = time.monotonic()

    frame_out = pl.concat([frame, results_frame(results)], how="horizontal")  # type: ignore[arg-type]
    error = None
    if fatal:
        first = fatal[0]
        error = FatalAPIError(f"stopped: {fatal_hint(first)}", code=first.code,
                              http_status=first.http_status)
    result = RunResult(frame_out, stats, error, control.reason)
    if error is not None:
        error.result = result
    return result


def run(frame: pl.DataFrame, config: RunConfig, spec: PromptSpec = PromptSpec(),
        **kwargs: Any) -> RunResult:
    """Synchronous ``arun``: for scripts and Airflow tasks (use ``arun`` inside a running loop)."""
    return asyncio.run(arun(frame, config, spec, **kwargs))


def run_frame(frame: pl.DataFrame, config: RunConfig, spec: PromptSpec = PromptSpec()) -> pl.DataFrame:
    """Answer every row of ``frame`` and return the output table.

    Row errors are in the ``status`` / ``error_code`` columns; a run the service refused as a
    whole raises ``FatalAPIError`` whose ``result.frame`` still holds every row.
    """
    result = run(frame, config, spec)
    if result.fatal is not None:
        raise result.fatal
    return result.frame


async def arun_frame(frame: pl.DataFrame, config: RunConfig,
                     spec: PromptSpec = PromptSpec()) -> pl.DataFrame:
    """``run_frame`` for code already inside an event loop (notebooks, async services)."""
    result = await arun(frame, config, spec)
    if result.fatal is not None:
        raise result.fatal
    return result.frame


STOP_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "budget": 5}


def exit_code(result: RunResult) -> int:
    if result.fatal is not None:
        return result.fatal.exit_code
    if result.stopped is not None:
        return STOP_EXIT_CODES.get(result.stopped, 1)
    return 0 if result.stats.error == 0 and result.stats.skipped == 0 else 3


__all__ = ["OUTPUT_COLUMNS", "RowResult", "RunControl", "RunResult", "RunStats", "arun",
           "arun_frame", "run", "run_frame"]
