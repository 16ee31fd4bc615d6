"""The pipeline: a prompt table in, the same table with answers out.

``run_frame`` / ``arun_frame`` are the library entry points; the CLI is a thin layer over
them. Rows are sent by an asyncio pool of ``concurrency`` workers, paced smoothly at
``rpm`` requests per minute, and every input row comes back exactly once, in input order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import polars as pl

from batchgen import compat
from batchgen.budget import IMAGE_TOKENS_TYPICAL, Budget, count_input_tokens, row_cost, thinks
from batchgen.client import Caller, CallOutcome, make_transport
from batchgen.config import MAX_CONCURRENCY, RunConfig
from batchgen.errors import FatalAPIError, UsageError
from batchgen.images import BAD_IMAGE, IMAGE_NOT_FOUND, has_local, materialize, portable
from batchgen.journal import CHANGED, RETRY, Answers, Entry, Journal, request_hash, reuse, row_keys
from batchgen.jsonmode import json_word_problem, mentions_json, reply_checker
from batchgen.pricing import PriceTable
from batchgen.prompts import PromptSpec, RowProblem, build_messages
from batchgen.protocol import APIError, Disposition, build_body, fatal_hint
from batchgen.ratelimit import Governor

if TYPE_CHECKING:
    import httpx

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
    governor: Governor | None = field(default=None, repr=False)  # the admitted rate, live

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
            self.sent_input_tokens += result.input_tokens or 0
            self.sent_output_tokens += result.output_tokens or 0


STOP_NOW = "batchgen: stop now"


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
            task.cancel(STOP_NOW)

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


def _now() -> datetime:
    return datetime.now(UTC)


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A request body's messages, native (``input.messages``) or OpenAI (``messages``)."""
    return body["input"]["messages"] if "input" in body else body["messages"]


def row_digest(body: dict[str, Any], endpoint: str, spec: PromptSpec) -> str:
    """The journal's hash of a row's request (local images by their path under the table)."""
    if spec.may_have_images:
        body = portable(body, spec.image_root)
    return request_hash(body, endpoint)


def request_body(config: RunConfig, messages: list[dict[str, Any]]) -> dict[str, Any] | RowProblem:
    """One row's request as the run's API takes it, or why the row cannot be sent.

    Shared by runs and dry runs, so both agree on what a row asks (and on its journal hash).
    Streaming flags are added only when sending: a streamed and an unstreamed call for the
    same row are the same request.
    """
    fmt = config.parameters.get("response_format")
    if (
        config.dashscope
        and isinstance(fmt, dict)
        and fmt.get("type") == "json_object"
        and not mentions_json(messages)
    ):
        return json_word_problem()
    if config.api == "openai":
        return compat.build_body(config.model, messages, config.parameters)
    return build_body(config.model, messages, config.parameters, config.effective_route)


@dataclass(slots=True)
class PlannedRow:
    """One row's verdict before anything is sent: why it cannot go, its journalled answer, or
    the request to send and why (``journal.NEW`` / ``CHANGED`` / ``RETRY``)."""

    key: str
    problem: RowProblem | None = None
    body: dict[str, Any] | None = None
    digest: str = ""
    earlier: Entry | None = None
    why: str | None = None


def plan_rows(
    frame: pl.DataFrame,
    raw: list[Any] | None,
    offset: int,
    config: RunConfig,
    spec: PromptSpec,
    *,
    id_column: str | None,
    endpoint: str,
    lookup: Callable[[list[str]], Mapping[str, Answers]] | None,
    retry_errors: bool,
) -> list[PlannedRow]:
    """messages → body → journal hash → journal verdict, for one batch: the one rule that a run,
    the resume line before it and ``--dry-run`` all follow."""
    keys = row_keys(frame, id_column, offset)
    previous = lookup(keys) if lookup is not None else {}
    planned = []
    for key, messages in zip(keys, build_messages(spec, frame, raw), strict=True):
        body = messages if isinstance(messages, RowProblem) else request_body(config, messages)
        if isinstance(body, RowProblem):
            planned.append(PlannedRow(key, problem=body))
            continue
        digest = row_digest(body, endpoint, spec)
        earlier, why = reuse(previous.get(key), digest, retry_errors=retry_errors)
        planned.append(PlannedRow(key, body=body, digest=digest, earlier=earlier, why=why))
    return planned


@dataclass
class ResumePlan:
    """What a resumed run will do, counted before anything is paid."""

    done: int = 0  # answered in the journal for today's request: not sent
    new: int = 0
    changed: int = 0
    retry: int = 0
    unsendable: int = 0  # rows that are errors without being sent (empty prompt, ...)

    @property
    def to_send(self) -> int:
        return self.new + self.changed + self.retry

    def line(self) -> str:
        parts = [
            f"{n:,} {what}"
            for n, what in (
                (self.changed, "changed since the last run"),
                (self.retry, "errors sent again"),
                (self.new, "never sent"),
            )
            if n
        ]
        detail = f" ({', '.join(parts)})" if parts and parts != [f"{self.new:,} never sent"] else ""
        unsendable = f"; {self.unsendable:,} not sendable" if self.unsendable else ""
        return f"resumed: {self.done:,} done, {self.to_send:,} to go{detail}{unsendable}"


def plan_resume(
    batches: Iterable[Batch],
    config: RunConfig,
    spec: PromptSpec,
    *,
    id_column: str | None,
    endpoint: str,
    lookup: Callable[[list[str]], Mapping[str, Answers]],
    retry_errors: bool,
) -> ResumePlan:
    """Count every row's verdict against the journal, without sending: the resume line."""
    plan = ResumePlan()
    offset = 0
    for frame, raw in batches:
        for row in plan_rows(
            frame, raw, offset, config, spec, id_column=id_column, endpoint=endpoint, lookup=lookup,
            retry_errors=retry_errors,
        ):  # fmt: skip
            if row.problem is not None:
                plan.unsendable += 1
            elif row.earlier is not None:
                plan.done += 1
            elif row.why == CHANGED:
                plan.changed += 1
            elif row.why == RETRY:
                plan.retry += 1
            else:
                plan.new += 1
        offset += frame.height
    return plan


def _result_of(
    outcome: CallOutcome, model: str, check_json: Callable[[str | None], bool] | None = None
) -> tuple[RowResult, bool]:
    """The row's output columns, and whether that outcome is final (sending again would repeat it)."""
    if outcome.reply is not None:
        r = outcome.reply
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
            http_status=outcome.http_status,
            attempts=outcome.attempts,
            latency_ms=outcome.latency_ms,
            finished_at=_now(),
        ), True
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
        finished_at=_now(),
    ), final


def _bill_cut_streams(
    outcome: CallOutcome, stats: RunStats, price: Any, outcome_model: str, parameters: dict[str, Any] | Any
) -> Decimal:
    """Streams cut midway are billed for what they generated: count it as spent, not lost."""
    billed_in, billed_out = outcome.billed
    if not (billed_in or billed_out):
        return Decimal(0)
    stats.cut_streams += 1
    stats.cut_output_tokens += billed_out
    stats.sent_input_tokens += billed_in
    stats.sent_output_tokens += billed_out
    if price is None:
        return Decimal(0)
    cost = price.cost(
        input_tokens=billed_in, output_tokens=billed_out, thinking=thinks(outcome_model, parameters) is True
    )
    stats.spent += cost
    return cost


def results_frame(results: list[RowResult]) -> pl.DataFrame:
    columns = {name: [getattr(r, name) for r in results] for name in OUTPUT_COLUMNS}
    return pl.DataFrame(columns, schema=OUTPUT_SCHEMA)


DEFAULT_OUTPUT_ESTIMATE = 512  # tokens reserved per reply under --tpm until replies are seen
UNREACHABLE_CODES = frozenset({"batchgen.ConnectionError", "batchgen.Timeout"})
UNREACHABLE_ROWS = 5


def _unreachable(config: RunConfig, outcome: CallOutcome) -> APIError:
    """Rows one after another exhausting every attempt without a connection: stop paying time."""
    assert outcome.error is not None
    return APIError(
        None,
        "batchgen.Unreachable",
        f"{UNREACHABLE_ROWS} rows in a row got no answer from {config.base_url} in "
        f"{outcome.attempts} attempts each; last: {outcome.error.message}",
        None,
        Disposition.FATAL,
    )


def _from_journal(entry: Entry) -> RowResult:
    values = dict(entry.result)
    if values.get("finished_at"):
        values["finished_at"] = datetime.fromisoformat(values["finished_at"])
    return RowResult(**{k: v for k, v in values.items() if k in RowResult.__dataclass_fields__})


Batch = tuple[pl.DataFrame, "list[Any] | None"]  # rows, and their messages cells as written
BATCHES_AHEAD = 4  # input batches read but not yet written: bounds memory, whatever the size


@dataclass
class _Pending:
    """One input batch on its way to the output: rows wait here until all have results."""

    offset: int
    frame: pl.DataFrame
    results: list[RowResult | None]
    waiting: int = 0  # rows handed to the workers and not finished yet
    enumerated: bool = False  # every row has been finished or handed out


async def arun_batches(
    batches: Iterable[Batch],
    total: int,
    config: RunConfig,
    spec: PromptSpec = PromptSpec(),
    *,
    write: Callable[[pl.DataFrame], None],
    id_column: str | None = None,
    endpoint: str | None = None,
    journal: Journal | None = None,
    retry_errors: bool = False,
    control: RunControl | None = None,
    prices: PriceTable | None = None,
    budget: Budget | None = None,
    progress: Callable[[RunStats], Coroutine[Any, Any, None]] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RunResult:
    """Answer ``total`` rows arriving in ``batches``, handing each batch, answered, to ``write``.

    Batches go to ``write`` in input order, each once all its rows have finished; at most
    ``BATCHES_AHEAD`` are held at a time, so memory does not grow with the table. With a
    ``journal`` (opened, locked), rows it holds for the same request are taken from it instead
    of being sent (permanent row errors too, unless ``retry_errors``) and every row that
    finishes is recorded at once; rows are keyed by ``id_column`` or their row number, and
    a journalled answer counts only for the same ``endpoint`` (default: the base URL), so a
    simulated answer is never taken for a real one.
    ``control`` stops the run from outside; a ``budget`` stops it before it could be
    overspent. ``transport`` replaces the default aiohttp-backed httpx transport.
    """
    control = control or RunControl()
    stats = RunStats(total=total)
    stats.priced = prices is not None
    model_price = prices.lookup(config.model) if prices is not None else None
    fatal: list[APIError] = []
    unreachable: list[APIError] = []  # rows in a row that never reached the service
    check_json = reply_checker(config.parameters, config.json_schema)
    governor = Governor(config.rpm, config.tpm, adaptive=config.adaptive)
    stats.governor = governor
    max_tokens = config.parameters.get("max_tokens")
    pending: deque[_Pending] = deque()
    room = asyncio.Event()  # set when a batch has been written
    # Never more workers than rows, nor than is useful (-c 1000000 once froze a 20-row run).
    concurrency = max(1, min(config.concurrency, MAX_CONCURRENCY, total))
    queue: asyncio.Queue[tuple[_Pending, int, str, dict[str, Any], str] | None] = asyncio.Queue(
        maxsize=2 * concurrency
    )
    where = endpoint or config.base_url

    def sending() -> bool:
        return not fatal and not control.stopping

    def finish(batch: _Pending, i: int, result: RowResult, *, resumed: bool = False) -> Decimal | None:
        batch.results[i] = result
        stats.add(result, resumed=resumed)
        if prices is None or result.status == SKIPPED:
            return None
        price = model_price if result.model == config.model else prices.lookup(result.model or "")
        cost = row_cost(price, result, prices.cached_ratio)
        stats.add_cost(cost, resumed=resumed)
        return cost

    def skip(batch: _Pending, i: int) -> None:
        finish(batch, i, RowResult(status=SKIPPED, model=config.model, attempts=0))

    def flush() -> None:
        """Write every batch at the head of the line whose rows have all finished."""
        while pending and pending[0].enumerated and pending[0].waiting == 0:
            batch = pending.popleft()
            out = pl.concat(
                [batch.frame, results_frame(batch.results)],  # type: ignore[arg-type]
                how="horizontal",
            )
            write(out)
            room.set()

    async def produce() -> None:
        offset = 0
        for frame, raw in batches:
            check_collisions(frame.columns)
            while len(pending) >= BATCHES_AHEAD:
                room.clear()
                await room.wait()
            batch = _Pending(offset, frame, [None] * frame.height)
            pending.append(batch)
            lookup = journal.lookup if journal is not None else None
            for i, row in enumerate(
                plan_rows(frame, raw, offset, config, spec, id_column=id_column, endpoint=where,
                          lookup=lookup, retry_errors=retry_errors)
            ):  # fmt: skip
                if row.problem is not None:
                    finish(
                        batch,
                        i,
                        RowResult(
                            status=ERROR,
                            model=config.model,
                            error_code=row.problem.code,
                            error_message=row.problem.message,
                            attempts=0,
                            finished_at=_now(),
                        ),
                    )
                    continue
                if row.earlier is not None:
                    earlier = _from_journal(row.earlier)
                    if check_json is not None and earlier.status == OK:  # today's schema
                        earlier.reply_json_valid = check_json(earlier.reply)
                    finish(batch, i, earlier, resumed=True)
                    continue
                if row.why == CHANGED:
                    stats.changed += 1
                if not sending():
                    skip(batch, i)
                    continue
                batch.waiting += 1
                assert row.body is not None
                await queue.put((batch, i, row.key, row.body, row.digest))
            batch.enumerated = True
            offset += frame.height
            flush()

    async with transport or make_transport(config) as http:
        caller = Caller(config, http, governor=governor, aborted=lambda: not sending(), sleep=sleep)

        async def _call(body: dict[str, Any], tokens: int, key: str) -> CallOutcome:
            try:
                return await caller.call(body, tokens)
            except Exception as exc:  # a bug here must cost one row, not the run's answers
                log.exception("unexpected error on row %s", key)
                return CallOutcome(
                    None,
                    APIError(
                        None,
                        "batchgen.InternalError",
                        f"{type(exc).__name__}: {exc}",
                        None,
                        Disposition.RETRY,
                    ),
                    0,
                    None,
                    None,
                    gave_up=True,
                )

        async def send(batch: _Pending, i: int, key: str, body: dict[str, Any], digest: str) -> None:
            worst = Decimal(0)
            if budget is not None:
                worst = budget.worst_case(config.model, messages_of(body))
                if not await budget.reserve(worst):
                    control.stop("budget")
                    skip(batch, i)
                    return
            tokens = 0
            if config.tpm is not None:
                tokens = count_input_tokens(
                    config.model, messages_of(body), IMAGE_TOKENS_TYPICAL
                ) + governor.output_estimate(max_tokens, DEFAULT_OUTPUT_ESTIMATE)
            try:
                if spec.may_have_images and has_local(body):  # read image files only now
                    body = await asyncio.to_thread(materialize, body)
            except OSError as exc:
                outcome = CallOutcome(
                    None,
                    APIError(
                        None,
                        IMAGE_NOT_FOUND,
                        f"an image file could not be read: {exc.strerror or exc}: {exc.filename}",
                        None,
                        Disposition.ROW_ERROR,
                    ),
                    0,
                    None,
                    None,
                )
            except ValueError as exc:
                outcome = CallOutcome(
                    None, APIError(None, BAD_IMAGE, str(exc), None, Disposition.ROW_ERROR), 0, None, None
                )
            else:
                outcome = await _call(body, tokens, key)
            if outcome.reply is not None:
                unreachable.clear()
            elif outcome.gave_up and outcome.error is not None and outcome.error.code in UNREACHABLE_CODES:
                unreachable.append(outcome.error)
                if len(unreachable) == UNREACHABLE_ROWS:
                    fatal.append(_unreachable(config, outcome))
            if outcome.error is not None and outcome.error.disposition is Disposition.FATAL:
                fatal.append(outcome.error)
            if fatal:
                caller.interrupt()
            result, final = _result_of(outcome, config.model, check_json)
            wasted = _bill_cut_streams(outcome, stats, model_price, config.model, config.parameters)
            if result.status != SKIPPED and journal is not None:
                journal.record(key, digest, final, result)
            cost = finish(batch, i, result)
            if budget is not None:
                await budget.settle(worst, (cost or Decimal(0)) + wasted)

        async def worker() -> None:
            while True:
                item = None
                try:
                    item = await queue.get()
                    if item is None:
                        return
                    if sending():
                        await send(*item)
                except Exception as exc:  # journal write failed (disk full), a bug: stop cleanly
                    log.debug("row %s failed", item[2] if item else "?", exc_info=True)
                    fatal.append(
                        APIError(
                            None,
                            "batchgen.InternalError",
                            f"{type(exc).__name__}: {exc}",
                            None,
                            Disposition.FATAL,
                        )
                    )
                    caller.interrupt()
                except asyncio.CancelledError as exc:
                    if exc.args != (STOP_NOW,):
                        raise
                    # stop_now: abandon this request, then keep draining the queue so the
                    # producer can account for every remaining row.
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                finally:
                    if item is not None:
                        batch, i = item[0], item[1]
                        if batch.results[i] is None:
                            skip(batch, i)
                        batch.waiting -= 1
                        flush()

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        control._attach(workers, caller.interrupt)
        tasks = [*workers, *([asyncio.create_task(progress(stats))] if progress else [])]
        producer = asyncio.create_task(produce())
        try:
            await producer
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers, return_exceptions=True)
        finally:
            control._detach()
            for task in [producer, *tasks]:
                task.cancel()
            await asyncio.gather(producer, *tasks, return_exceptions=True)
    # Whatever stopped early (stop_now cancelled workers): every row still reaches the output.
    while not queue.empty():
        item = queue.get_nowait()
        if item is not None:
            item[0].waiting -= 1
    for batch in pending:
        for i, result in enumerate(batch.results):
            if result is None:
                skip(batch, i)
        batch.waiting, batch.enumerated = 0, True
    flush()
    if stats.done != total:  # the producer was cancelled mid-input (a second Ctrl-C)
        log.warning("%s rows were not read before the run stopped", f"{total - stats.done:,}")
    stats.finished = time.monotonic()
    if stats.cut_streams:
        log.info(
            "%s rows had streams cut before their end and sent again; DashScope bills what "
            "a cut stream generated (%s output tokens), counted in this run's spend",
            f"{stats.cut_streams:,}",
            f"{stats.cut_output_tokens:,}",
        )
    error = None
    if fatal:
        first = fatal[0]
        error = FatalAPIError(f"stopped: {fatal_hint(first)}", code=first.code, http_status=first.http_status)
    run_result = RunResult(None, stats, error, control.reason)
    if error is not None:
        error.result = run_result
    return run_result


async def arun(
    frame: pl.DataFrame,
    config: RunConfig,
    spec: PromptSpec = PromptSpec(),
    *,
    batch_rows: int = 4096,
    **options: Any,
) -> RunResult:
    """Answer every row of an in-memory ``frame``; the result holds the output frame.

    Never raises for API trouble: it is reported in ``RunResult`` (``fatal``, ``stats``, row
    ``status``). Takes the options of ``arun_batches``.
    """
    check_collisions(frame.columns)
    parts: list[pl.DataFrame] = []
    slices = ((frame.slice(i, batch_rows), None) for i in range(0, frame.height, batch_rows))
    result = await arun_batches(slices, frame.height, config, spec, write=parts.append, **options)
    result.frame = (
        pl.concat(parts) if parts else pl.concat([frame.clear(), results_frame([])], how="horizontal")
    )
    return result


def run(frame: pl.DataFrame, config: RunConfig, spec: PromptSpec = PromptSpec(), **kwargs: Any) -> RunResult:
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
    assert result.frame is not None  # arun always sets it
    return result.frame


async def arun_frame(frame: pl.DataFrame, config: RunConfig, spec: PromptSpec = PromptSpec()) -> pl.DataFrame:
    """``run_frame`` for code already inside an event loop (notebooks, async services)."""
    result = await arun(frame, config, spec)
    if result.fatal is not None:
        raise result.fatal
    assert result.frame is not None  # arun always sets it
    return result.frame


STOP_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "budget": 5}


def exit_code(result: RunResult) -> int:
    if result.fatal is not None:
        return result.fatal.exit_code
    if result.stopped is not None:
        return STOP_EXIT_CODES.get(result.stopped, 1)
    return 0 if result.stats.error == 0 and result.stats.skipped == 0 else 3


__all__ = [
    "OUTPUT_COLUMNS",
    "RowResult",
    "RunControl",
    "RunResult",
    "RunStats",
    "arun",
    "arun_frame",
    "run",
    "run_frame",
]
