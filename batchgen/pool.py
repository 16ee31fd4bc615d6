"""The worker pool: input batches in, answered batches out, in input order, every row once.

A producer plans each batch's rows (``planning.plan_rows``) and queues those to send; a fixed
set of workers sends them through one ``Caller`` (pacing, retries); finished batches are
written in input order as soon as every row of the batch at the head is done, and at most
``BATCHES_AHEAD`` batches are held, so memory does not grow with the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import polars as pl

from batchgen.api.faults import fatal_hint
from batchgen.api.models import thinks
from batchgen.api.types import APIError, Disposition
from batchgen.budget import IMAGE_TOKENS_TYPICAL, Budget, count_input_tokens, row_cost
from batchgen.client import Caller, CallOutcome
from batchgen.config import MAX_CONCURRENCY, RunConfig
from batchgen.errors import FatalAPIError
from batchgen.images import BAD_IMAGE, IMAGE_NOT_FOUND, has_local, materialize
from batchgen.journal import CHANGED, GroupCommitError, Journal
from batchgen.jsonmode import reply_checker
from batchgen.planning import Batch, PlannedRow, plan_rows
from batchgen.pricing import PriceTable
from batchgen.prompts import PromptSpec
from batchgen.ratelimit import Governor, Pacing
from batchgen.redisstore import open_store
from batchgen.results import (
    ERROR,
    OK,
    PENDING,
    SKIPPED,
    RowResult,
    RunResult,
    RunStats,
    check_collisions,
    from_journal,
    result_of,
    results_frame,
    utc_now,
)
from batchgen.sharedrate import SharedGovernor
from batchgen.transport import make_transport

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("batchgen")

BATCHES_AHEAD = 4  # input batches read but not yet written: bounds memory, whatever the size
DEFAULT_OUTPUT_ESTIMATE = 512  # tokens reserved per reply under --tpm until replies are seen
UNREACHABLE_CODES = frozenset({"batchgen.ConnectionError", "batchgen.Timeout"})
UNREACHABLE_ROWS = 5
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

    @contextlib.contextmanager
    def watching(self, task: asyncio.Task[None]) -> Iterator[None]:
        """``stop_now`` (or the grace's end) cancels ``task`` while the block runs."""
        self._attach([task], lambda: None)
        try:
            yield
        finally:
            self._detach()

    def _attach(self, tasks: list[asyncio.Task[None]], interrupt: Callable[[], None]) -> None:
        self._tasks = tasks
        self._interrupt = interrupt

    def _detach(self) -> None:
        self._tasks = []
        self._interrupt = None
        if self._grace_timer is not None:
            self._grace_timer.cancel()


@dataclass
class _Pending:
    """One input batch on its way to the output: rows wait here until all have results."""

    offset: int
    frame: pl.DataFrame
    results: list[RowResult | None]
    waiting: int = 0  # rows handed to the workers and not finished yet
    enumerated: bool = False  # every row has been finished or handed out


@dataclass(slots=True)
class _Job:
    """One row handed to the workers."""

    batch: _Pending
    index: int
    key: str
    body: dict[str, Any]
    digest: str


def _failed(code: str, message: str, disposition: Disposition, *, gave_up: bool = False) -> CallOutcome:
    """A row that ended without an HTTP answer (an image that could not be read, a bug)."""
    return CallOutcome(None, APIError(None, code, message, None, disposition), 0, None, None, gave_up=gave_up)


@dataclass
class PoolOptions:
    """What ``arun_batches`` takes besides the rows and the config; see its docstring."""

    write: Callable[[pl.DataFrame], None]
    id_column: str | None = None
    endpoint: str | None = None
    journal: Journal | None = None
    retry_errors: bool = False
    control: RunControl | None = None
    prices: PriceTable | None = None
    budget: Budget | None = None
    progress: Callable[[RunStats], Coroutine[Any, Any, None]] | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    transport: httpx.AsyncBaseTransport | None = None
    # Batch mode: each planned row's result when it must not be sent (pending in a batch, ...),
    # and whether it counts as resumed.
    hold: Callable[[list[PlannedRow]], list[tuple[RowResult, bool] | None]] | None = None
    # Pacing shared with other pools (a Ray actor's, a library user's); None: the run's own.
    governor: Pacing | None = None


class Pool:
    """One run: the producer, the workers, the batches in flight, and what stops them."""

    def __init__(self, total: int, config: RunConfig, spec: PromptSpec, options: PoolOptions) -> None:
        self.config = config
        self.spec = spec
        self.options = options
        self.control = options.control or RunControl()
        self.stats = RunStats(total=total, priced=options.prices is not None)
        prices = options.prices
        self.model_price = prices.lookup(config.model) if prices is not None else None
        self.check_json = reply_checker(config.parameters, config.json_schema)
        self.owned_store = False  # a store this pool opened for --rate-store, closed at the end
        self.governor = options.governor or self._governor()
        self.stats.governor = self.governor
        self.fatal: list[APIError] = []
        self.unreachable: list[APIError] = []  # rows one after another that never reached the service
        self.pending: deque[_Pending] = deque()
        self.room = asyncio.Event()  # set when a batch has been written
        # Never more workers than rows, nor than is useful (-c 1000000 once froze a 20-row run).
        self.concurrency = max(1, min(config.concurrency, MAX_CONCURRENCY, total))
        self.queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=2 * self.concurrency)
        self.endpoint = options.endpoint or config.base_url
        self.caller: Caller | None = None

    def _governor(self) -> Pacing:
        """The run's own pacing: in this process, or taking its slots from ``--rate-store``."""
        config, options = self.config, self.options
        if config.rate_store is None:
            return Governor(
                config.rpm, config.tpm, adaptive=config.adaptive, clock=options.clock, sleep=options.sleep
            )
        store = open_store(config.rate_store, config.effective_rate_key)
        self.owned_store = True
        return SharedGovernor(
            store, config.rpm, config.tpm, adaptive=config.adaptive, clock=options.clock, sleep=options.sleep
        )

    # -- rows finishing ----------------------------------------------------------------------
    def sending(self) -> bool:
        return not self.fatal and not self.control.stopping

    def finish(self, batch: _Pending, i: int, result: RowResult, *, resumed: bool = False) -> Decimal | None:
        """Put a row's result in its batch and count it; its cost when the run is priced."""
        batch.results[i] = result
        self.stats.add(result, resumed=resumed)
        prices = self.options.prices
        if prices is None or result.status in (SKIPPED, PENDING):
            return None
        model = result.model or ""
        price = self.model_price if model == self.config.model else prices.lookup(model)
        cost = row_cost(price, result, prices.cached_ratio)
        self.stats.add_cost(cost, resumed=resumed)
        return cost

    def skip(self, batch: _Pending, i: int) -> None:
        self.finish(batch, i, RowResult(status=SKIPPED, model=self.config.model, attempts=0))

    def flush(self) -> None:
        """Write every batch at the head of the line whose rows have all finished."""
        while self.pending and self.pending[0].enumerated and self.pending[0].waiting == 0:
            batch = self.pending.popleft()
            results = results_frame(batch.results)  # type: ignore[arg-type]
            self.options.write(pl.concat([batch.frame, results], how="horizontal"))
            self.room.set()

    # -- the producer ------------------------------------------------------------------------
    async def produce(self, batches: Iterable[Batch]) -> None:
        offset = 0
        for frame, raw in batches:
            check_collisions(frame.columns)
            while len(self.pending) >= BATCHES_AHEAD:
                self.room.clear()
                await self.room.wait()
            batch = _Pending(offset, frame, [None] * frame.height)
            self.pending.append(batch)
            journal = self.options.journal
            planned = plan_rows(
                frame, raw, offset, self.config, self.spec, id_column=self.options.id_column,
                endpoint=self.endpoint, lookup=journal.lookup if journal is not None else None,
                retry_errors=self.options.retry_errors,
            )  # fmt: skip
            held = self.options.hold(planned) if self.options.hold else [None] * len(planned)
            for i, (row, kept) in enumerate(zip(planned, held, strict=True)):
                if kept is not None:
                    self.finish(batch, i, kept[0], resumed=kept[1])
                elif not self.settled_before_sending(batch, i, row):
                    batch.waiting += 1
                    assert row.body is not None
                    await self.queue.put(_Job(batch, i, row.key, row.body, row.digest))
            batch.enumerated = True
            offset += frame.height
            self.flush()

    def settled_before_sending(self, batch: _Pending, i: int, row: PlannedRow) -> bool:
        """Finish a row that needs no request (unsendable, journalled, the run stopping)."""
        if row.problem is not None:
            problem = RowResult(
                status=ERROR, model=self.config.model, error_code=row.problem.code,
                error_message=row.problem.message, attempts=0, finished_at=utc_now(),
            )  # fmt: skip
            self.finish(batch, i, problem)
            return True
        if row.earlier is not None:
            earlier = from_journal(row.earlier)
            if self.check_json is not None and earlier.status == OK:  # today's schema
                earlier.reply_json_valid = self.check_json(earlier.reply)
            self.finish(batch, i, earlier, resumed=True)
            return True
        if row.why == CHANGED:
            self.stats.changed += 1
        if not self.sending():
            self.skip(batch, i)
            return True
        return False

    # -- one row -----------------------------------------------------------------------------
    async def send(self, job: _Job) -> None:
        budget = self.options.budget
        worst = Decimal(0)
        if budget is not None:
            worst = budget.worst_case(self.config.model, self.config.dialect.messages(job.body))
            if not await budget.reserve(worst):
                self.control.stop("budget")
                self.skip(job.batch, job.index)
                return
        outcome = await self.outcome(job)
        self.observe(outcome)
        result, final = result_of(outcome, self.config.model, self.check_json)
        wasted = self.bill_cut_streams(outcome)
        journal = self.options.journal
        if result.status != SKIPPED and journal is not None:
            journal.record(job.key, job.digest, final, result)
        cost = self.finish(job.batch, job.index, result)
        if budget is not None:
            await budget.settle(worst, (cost or Decimal(0)) + wasted)

    def token_estimate(self, body: dict[str, Any]) -> int:
        """Input plus expected output tokens, reserved under ``--tpm`` (0 without it)."""
        if self.config.tpm is None:
            return 0
        max_tokens = self.config.parameters.get("max_tokens")
        messages = self.config.dialect.messages(body)
        counted = count_input_tokens(self.config.model, messages, IMAGE_TOKENS_TYPICAL)
        return counted + self.governor.output_estimate(max_tokens, DEFAULT_OUTPUT_ESTIMATE)

    async def outcome(self, job: _Job) -> CallOutcome:
        """The row's calls, its local images read only now; a bug costs this row, not the run."""
        body = job.body
        tokens = self.token_estimate(body)
        try:
            if self.spec.may_have_images and has_local(body):
                body = await asyncio.to_thread(materialize, body)
        except OSError as exc:
            detail = f"an image file could not be read: {exc.strerror or exc}: {exc.filename}"
            return _failed(IMAGE_NOT_FOUND, detail, Disposition.ROW_ERROR)
        except ValueError as exc:
            return _failed(BAD_IMAGE, str(exc), Disposition.ROW_ERROR)
        assert self.caller is not None
        try:
            return await self.caller.call(body, tokens)
        except Exception as exc:
            log.exception("unexpected error on row %s", job.key)
            detail = f"{type(exc).__name__}: {exc}"
            return _failed("batchgen.InternalError", detail, Disposition.RETRY, gave_up=True)

    def observe(self, outcome: CallOutcome) -> None:
        """A fatal answer, or rows one after another never reaching the service, stop the run."""
        error = outcome.error
        if outcome.reply is not None:
            self.unreachable.clear()
        elif outcome.gave_up and error is not None and error.code in UNREACHABLE_CODES:
            self.unreachable.append(error)
            if len(self.unreachable) == UNREACHABLE_ROWS:
                self.fatal.append(self.unreachable_error(outcome))
        if error is not None and error.disposition is Disposition.FATAL:
            self.fatal.append(error)
        if self.fatal and self.caller is not None:
            self.caller.interrupt()

    def unreachable_error(self, outcome: CallOutcome) -> APIError:
        assert outcome.error is not None
        message = (
            f"{UNREACHABLE_ROWS} rows in a row got no answer from {self.config.base_url} in "
            f"{outcome.attempts} attempts each; last: {outcome.error.message}"
        )
        return APIError(None, "batchgen.Unreachable", message, None, Disposition.FATAL)

    def bill_cut_streams(self, outcome: CallOutcome) -> Decimal:
        """Streams cut midway are billed for what they generated: count it as spent, not lost."""
        billed_in, billed_out = outcome.billed
        if not (billed_in or billed_out):
            return Decimal(0)
        stats = self.stats
        stats.cut_streams += 1
        stats.cut_output_tokens += billed_out
        stats.sent_input_tokens += billed_in
        stats.sent_output_tokens += billed_out
        if self.model_price is None:
            return Decimal(0)
        thinking = thinks(self.config.model, self.config.parameters) is True
        cost = self.model_price.cost(input_tokens=billed_in, output_tokens=billed_out, thinking=thinking)
        stats.spent += cost
        return cost

    # -- the workers -------------------------------------------------------------------------
    async def worker(self) -> None:
        while True:
            job = None
            try:
                job = await self.queue.get()
                if job is None:
                    return
                if self.sending():
                    await self.send(job)
            except Exception as exc:  # journal write failed (disk full), a bug: stop cleanly
                log.debug("row %s failed", job.key if job else "?", exc_info=True)
                detail = f"{type(exc).__name__}: {exc}"
                self.fatal.append(APIError(None, "batchgen.InternalError", detail, None, Disposition.FATAL))
                assert self.caller is not None
                self.caller.interrupt()
            except asyncio.CancelledError as exc:
                if exc.args != (STOP_NOW,):
                    raise
                # stop_now: abandon this request, then keep draining the queue so the
                # producer can account for every remaining row.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            finally:
                if job is not None:
                    if job.batch.results[job.index] is None:
                        self.skip(job.batch, job.index)
                    job.batch.waiting -= 1
                    self.flush()

    # -- the run -----------------------------------------------------------------------------
    async def run(self, batches: Iterable[Batch]) -> RunResult:
        async with self.options.transport or make_transport(self.config) as http:
            self.caller = Caller(
                self.config, http, governor=self.governor, aborted=lambda: not self.sending(),
                sleep=self.options.sleep,
            )  # fmt: skip
            try:
                await self.drive_journalled(batches)
            finally:
                if self.owned_store and isinstance(self.governor, SharedGovernor):
                    await self.governor.aclose()
        self.account_for_the_rest()
        return self.outcome_of_run()

    async def drive_journalled(self, batches: Iterable[Batch]) -> None:
        """``drive``, the journal committing finished rows in groups (``journal.COMMIT_WINDOW``)."""
        journal = self.options.journal
        if journal is None:
            await self.drive(batches)
            return
        try:
            with journal.grouped():
                await self.drive(batches)
        except GroupCommitError as exc:  # the last commit failed (disk full): stop as a worker does
            log.debug("the journal's last commit failed", exc_info=True)
            self.fatal.append(APIError(None, "batchgen.InternalError", str(exc), None, Disposition.FATAL))

    async def drive(self, batches: Iterable[Batch]) -> None:
        """Start the workers, feed them every row, then wait until they are done."""
        assert self.caller is not None
        workers = [asyncio.create_task(self.worker()) for _ in range(self.concurrency)]
        self.control._attach(workers, self.caller.interrupt)
        progress = self.options.progress
        tasks = [*workers, *([asyncio.create_task(progress(self.stats))] if progress else [])]
        producer = asyncio.create_task(self.produce(batches))
        try:
            await producer
            for _ in workers:
                await self.queue.put(None)
            await asyncio.gather(*workers, return_exceptions=True)
        finally:
            self.control._detach()
            for task in [producer, *tasks]:
                task.cancel()
            await asyncio.gather(producer, *tasks, return_exceptions=True)

    def account_for_the_rest(self) -> None:
        """Whatever stopped early (stop_now cancelled workers): every row still reaches the output."""
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if job is not None:
                job.batch.waiting -= 1
        for batch in self.pending:
            for i, result in enumerate(batch.results):
                if result is None:
                    self.skip(batch, i)
            batch.waiting, batch.enumerated = 0, True
        self.flush()
        stats = self.stats
        if stats.done != stats.total:  # the producer was cancelled mid-input (a second Ctrl-C)
            log.warning("%s rows were not read before the run stopped", f"{stats.total - stats.done:,}")
        stats.finished = time.monotonic()

    def outcome_of_run(self) -> RunResult:
        stats = self.stats
        if stats.cut_streams:
            log.info(
                "%s rows had streams cut before their end and sent again; DashScope bills what "
                "a cut stream generated (%s output tokens), counted in this run's spend",
                f"{stats.cut_streams:,}",
                f"{stats.cut_output_tokens:,}",
            )
        error = None
        if self.fatal:
            first = self.fatal[0]
            message = f"stopped: {fatal_hint(first)}"
            error = FatalAPIError(message, code=first.code, http_status=first.http_status)
        result = RunResult(None, stats, error, self.control.reason)
        if error is not None:
            error.result = result
        return result
