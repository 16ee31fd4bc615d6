"""The pipeline: a prompt table in, the same table with answers out.

``run_frame`` / ``arun_frame`` are the library entry points; the CLI is a thin layer over
them. Rows are sent by an asyncio pool of ``concurrency`` workers, paced smoothly at
``rpm`` requests per minute, and every input row comes back exactly once, in input order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import polars as pl
from aiolimiter import AsyncLimiter

from batchgen.client import Caller, CallOutcome, make_transport
from batchgen.config import RunConfig
from batchgen.errors import FatalAPIError, UsageError
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
    input_tokens: int = 0
    output_tokens: int = 0
    attempts: int = 0
    error_codes: Counter[str] = field(default_factory=Counter)
    finished: float | None = None

    @property
    def done(self) -> int:
        return self.ok + self.error + self.skipped

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def add(self, result: RowResult) -> None:
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
        self.attempts += result.attempts or 0


@dataclass
class RunResult:
    """What a run produced: the output table, its counters, and the fatal error if it stopped."""

    frame: pl.DataFrame
    stats: RunStats
    fatal: FatalAPIError | None = None


def check_collisions(columns: list[str]) -> None:
    clashes = [c for c in columns if c in OUTPUT_SCHEMA]
    if clashes:
        raise UsageError(f"input column {clashes[0]!r} has the name of an output column: rename it "
                         f"(output columns: {', '.join(OUTPUT_COLUMNS)})")


def _now() -> datetime:
    return datetime.now(UTC)


def _result_of(outcome: CallOutcome, model: str) -> RowResult:
    if outcome.reply is not None:
        r = outcome.reply
        return RowResult(
            status=OK, model=model, reply=r.content, reasoning=r.reasoning,
            finish_reason=r.finish_reason, request_id=r.request_id, input_tokens=r.input_tokens,
            output_tokens=r.output_tokens, total_tokens=r.total_tokens,
            cached_tokens=r.cached_tokens, reasoning_tokens=r.reasoning_tokens,
            http_status=outcome.http_status, attempts=outcome.attempts,
            latency_ms=outcome.latency_ms, finished_at=_now())
    error = outcome.error
    if error is None:  # the run stopped before this row's first attempt
        return RowResult(status=SKIPPED, model=model, attempts=0)
    message = error.message
    if outcome.gave_up:
        status = ERROR
        plural = "s" if outcome.attempts != 1 else ""
        message = f"gave up after {outcome.attempts} attempt{plural}: {message}"
    elif error.disposition is Disposition.RETRY:
        status = SKIPPED  # interrupted between retries by a fatal error elsewhere
        message = f"not finished, the run stopped; last attempt: {message}"
    else:
        status = ERROR
    return RowResult(status=status, model=model, request_id=error.request_id,
                     error_code=error.code, error_message=message,
                     http_status=outcome.http_status, attempts=outcome.attempts,
                     latency_ms=outcome.latency_ms, finished_at=_now())


def results_frame(results: list[RowResult]) -> pl.DataFrame:
    columns = {name: [getattr(r, name) for r in results] for name in OUTPUT_COLUMNS}
    return pl.DataFrame(columns, schema=OUTPUT_SCHEMA)


async def arun(frame: pl.DataFrame, config: RunConfig, spec: PromptSpec = PromptSpec(), *,
               on_result: Callable[[int, RowResult], None] | None = None,
               progress: Callable[[RunStats], Awaitable[None]] | None = None,
               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
               transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Answer every row of ``frame``; never raises for API trouble, it reports it in ``RunResult``.

    ``on_result(index, result)`` is called as each row finishes; ``progress(stats)`` runs as a
    task for the length of the run and is cancelled at its end. ``transport`` replaces the
    default aiohttp-backed httpx transport; the run closes it.
    """
    check_collisions(frame.columns)
    plan = build_messages(spec, frame)
    n = len(plan)
    results: list[RowResult | None] = [None] * n
    stats = RunStats(total=n)
    fatal: list[APIError] = []

    def finish(index: int, result: RowResult) -> None:
        results[index] = result
        stats.add(result)
        if on_result is not None:
            on_result(index, result)

    to_send: list[int] = []
    for index, item in enumerate(plan):
        if isinstance(item, RowProblem):
            finish(index, RowResult(status=ERROR, model=config.model, error_code=item.code,
                                    error_message=item.message, attempts=0, finished_at=_now()))
        else:
            to_send.append(index)

    # A leaky bucket one request deep: a request every 60/rpm seconds and never a burst, so no
    # 1-second window carries more than rpm/60 + 1 requests, the first second included.
    limiter = AsyncLimiter(1, 60.0 / config.rpm)
    route = config.effective_route
    queue = iter(to_send)

    async with transport or make_transport(config) as http:
        caller = Caller(config, http, acquire=limiter.acquire, aborted=lambda: bool(fatal),
                        sleep=sleep)

        async def worker() -> None:
            for index in queue:
                if fatal:
                    finish(index, RowResult(status=SKIPPED, model=config.model, attempts=0))
                    continue
                messages = plan[index]
                assert not isinstance(messages, RowProblem)
                body = build_body(config.model, messages, config.parameters, route)
                outcome = await caller.call(body)
                if outcome.error is not None and outcome.error.disposition is Disposition.FATAL:
                    fatal.append(outcome.error)
                finish(index, _result_of(outcome, config.model))

        workers = [asyncio.create_task(worker())
                   for _ in range(min(config.concurrency, len(to_send)))]
        tasks = [*workers, *([asyncio.create_task(progress(stats))] if progress else [])]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    stats.finished = time.monotonic()

    frame_out = pl.concat([frame, results_frame(results)], how="horizontal")  # type: ignore[arg-type]
    error = None
    if fatal:
        first = fatal[0]
        error = FatalAPIError(f"stopped: {fatal_hint(first)}", code=first.code,
                              http_status=first.http_status)
    result = RunResult(frame_out, stats, error)
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


def exit_code(result: RunResult) -> int:
    if result.fatal is not None:
        return result.fatal.exit_code
    return 0 if result.stats.error == 0 and result.stats.skipped == 0 else 3


__all__ = ["OUTPUT_COLUMNS", "RowResult", "RunResult", "RunStats", "arun", "arun_frame",
           "run", "run_frame"]
