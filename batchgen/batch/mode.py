"""Batch mode's one idempotent pass over a run: settle, collect, submit, (wait); then the pool
writes the output, taking every row from the journal or holding it as ``pending``.

1. Settle what the journal says is on the service (``store``): a chunk formed but never
   uploaded is dropped; one uploaded whose batch id was not recorded is looked up by its name
   (the batch's ``metadata.ds_name``) before anything is sent again; a batch that has ended is
   collected: every row of its chunk gets a journal entry (answered, refused, never run, or
   missing from both files), in one commit, and its files are deleted.
2. Submit every row that needs an answer and is in no open batch, in chunks of at most 50,000
   lines and 480 MB, written to a temporary file beside the output (memory stays flat) and
   named after their content, so a rerun rebuilds the same files.
3. With ``wait``, poll (60 s, backing off to 5 min) until no batch is open, collecting each.

A row inside a batch that has not ended is never sent again, online or in another batch. Rows
a batch ended without running go in a new batch on the next run (``fallback="batch"``), are
sent online by this run (``"online"``) or stay errors (``"none"``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from batchgen.batch.lines import BATCH, ChunkFile, line_problem, read_result_line, request_line, unanswered
from batchgen.batch.remote import BatchAPI, LostAnswer, RemoteBatch
from batchgen.batch.store import (
    ABANDONED,
    COLLECTED,
    FORMED,
    SIMULATED,
    UPLOADED,
    BatchStore,
    Chunk,
    ChunkRow,
    service_name,
)
from batchgen.budget import Budget
from batchgen.config import RunConfig
from batchgen.errors import FatalAPIError, RowProblem
from batchgen.images import has_local, materialize
from batchgen.journal import Entry, Journal
from batchgen.jsonmode import reply_checker
from batchgen.planning import Batch, PlannedRow, plan_rows
from batchgen.pool import RunControl
from batchgen.prompts import PromptSpec
from batchgen.results import ERROR, PENDING, SKIPPED, RowResult, from_journal, utc_now

log = logging.getLogger("batchgen")

FALLBACKS = ("batch", "online", "none")
Hold = Callable[[list[PlannedRow]], "list[tuple[RowResult, bool] | None]"]  # the pool's ``hold``
_GIVEN_UP = frozenset({"failed", "expired", "cancelling", "cancelled"})
LISTING_GRACE_SECONDS = 600  # a batch made moments ago may not be listed yet: look again later
RETENTION_SECONDS = 30 * 86400  # the service answers for a batch this long after its creation


def now() -> float:
    """The time, for the 30-day rule (tests move it)."""
    return time.time()


def _utc(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (ValueError, OverflowError, OSError):  # not unix seconds (milliseconds, say)
        return f"at {seconds!r}"


@dataclass(frozen=True)
class BatchSettings:
    """How batch mode runs: ``--batch-window``, ``--wait``, ``--batch-fallback``."""

    window: str = "24h"
    wait: bool = False
    fallback: str = "batch"
    poll: float = 60.0  # first wait between polls under --wait, then x1.5 up to poll_max
    poll_max: float = 300.0
    speed: float = 1.0  # the simulator's batch clock speed: waits are divided by it
    simulated: bool = False  # --simulate: the batches live in a simulator that ends with the run


@dataclass
class BatchRun:
    """One run's batch pass; ``hold`` then tells the pool what each row is."""

    config: RunConfig
    spec: PromptSpec
    journal: Journal
    api: BatchAPI
    settings: BatchSettings
    output: Path
    id_column: str | None
    endpoint: str
    retry_errors: bool = False
    control: RunControl = field(default_factory=RunControl)
    budget: Budget | None = None  # --max-cost: a batch's worst case is committed as it is submitted
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    store: BatchStore = field(init=False)
    collected_now: set[str] = field(default_factory=set)  # their leftovers wait for the next run
    mine: set[str] = field(default_factory=set)  # chunks this run submitted
    told: set[str] = field(default_factory=set)  # chunks whose "not listed yet" was said
    submitted: int = 0

    def __post_init__(self) -> None:
        self.store = BatchStore(self.journal)
        self.check_json = reply_checker(self.config.parameters, self.config.json_schema)

    def stopping(self) -> bool:
        return self.control.stopping

    @property
    def base_url(self) -> str:
        """Where this run's batches live (recorded with each chunk; one from elsewhere is left
        for a run there)."""
        return SIMULATED if self.settings.simulated else self.config.base_url

    @property
    def service(self) -> str:
        return service_name(self.base_url, self.config.workspace)

    async def prepare(self, batches: Iterable[Batch]) -> None:
        """Settle, collect, submit, and with ``wait`` poll until every batch has ended."""
        await self.settle()
        if not self.stopping():
            await self.submit(batches)
        if self.settings.wait:
            await self.wait()
        elif self.settings.simulated and self.submitted:
            log.warning(
                "--simulate's simulator ends with this run, and its batches with it: the next run "
                "sends these rows again. Add --wait, or start `batchgen simulate` and point "
                "DASHSCOPE_HTTP_BASE_URL at it to keep batches between runs"
            )

    # -- 1. settle ---------------------------------------------------------------------------
    async def settle(self, *, resubmit: bool = True) -> list[RemoteBatch]:
        """Every open chunk brought up to date; the batches still running. ``resubmit``: a
        chunk whose create made no batch may be given up (its rows are submitted next)."""
        for file_id in self.store.unfreed(self.service):  # a run stopped between a commit and its deletes
            await self.free(file_id)
        running = []
        for chunk in self.store.chunks(open_only=True):
            remote = await self.settle_chunk(chunk, resubmit=resubmit)
            if remote is not None and not remote.ended:
                running.append(remote)
        return running

    async def settle_chunk(self, chunk: Chunk, *, resubmit: bool = True) -> RemoteBatch | None:
        if chunk.base_url == SIMULATED and chunk.name not in self.mine:
            log.warning(
                "%s ran on the simulator of an earlier --simulate run, which ended with it: its "
                "%s rows are sent again", chunk.batch_id or chunk.name, f"{chunk.lines:,}",
            )  # fmt: skip
            self.store.close(chunk.name, ABANDONED)
            return None
        if chunk.state == FORMED:  # killed before its upload was recorded: no batch can exist
            if chunk.service == self.service:
                for file_id in await self.api.files_named(f"{chunk.name}.jsonl"):
                    await self.free(file_id)  # an upload whose answer never came
            self.store.close(chunk.name, ABANDONED)
            return None
        if chunk.service != self.service:  # its batch may run there: its rows wait for a run that reaches it
            log.warning(
                "%s (%s rows) was submitted to %s, not %s: its rows stay pending; collect it "
                "with the base URL, --region or --workspace that reaches it",
                chunk.batch_id or chunk.name, f"{chunk.lines:,}", chunk.service, self.service,
            )  # fmt: skip
            return None
        if chunk.state == UPLOADED:  # killed between upload and create: did the create happen?
            assert chunk.file_id is not None
            found = await self.created_from(chunk.name, chunk.file_id)
            recent = now() - (chunk.create_sent_at or 0.0) < LISTING_GRACE_SECONDS
            if found is None and (recent or not resubmit):  # a batch made moments ago may not show yet
                if chunk.name not in self.told:
                    self.told.add(chunk.name)
                    log.warning(
                        "no batch of %s is listed yet; its %s rows stay pending: a run 10 minutes "
                        "after its create looks again", chunk.name, f"{chunk.lines:,}",
                    )  # fmt: skip
                return None
            if found is None:  # no create took effect: the rows go again, in a new file
                await self.free(chunk.file_id)
                self.store.close(chunk.name, ABANDONED)
                return None
            self.store.set_batch(chunk.name, found.id, found.status, found.created_at or time.time())
            chunk = replace(chunk, batch_id=found.id, submitted_at=found.created_at)
        assert chunk.batch_id is not None
        try:
            remote = await self.api.retrieve(chunk.batch_id)
        except FatalAPIError as exc:
            if exc.http_status != 404:
                raise
            self.unknown(chunk, exc)
            return None
        self.store.set_remote_status(chunk.name, remote.status)
        if remote.ended:
            await self.collect(chunk, remote)
        return remote

    async def created_from(self, name: str, file_id: str) -> RemoteBatch | None:
        """The batch a lost create made of ``file_id``, if any; of several (a service that made
        two), the oldest still useful is kept and the others cancelled: only one runs and is paid."""
        found = await self.api.find(name, file_id)
        if not found:
            return None
        keep = next((b for b in found if b.status not in _GIVEN_UP), found[0])  # oldest still useful
        for extra in found:
            if extra is not keep:
                log.warning("batch %s repeats %s (same file, %s): cancelling it", extra.id, keep.id, name)
                if not extra.ended and extra.status != "cancelling":
                    await self.api.cancel(extra.id)
        return keep

    def unknown(self, chunk: Chunk, exc: FatalAPIError) -> None:
        """A batch the service answers 404 for: past its 30 days, its rows go again; before, it
        may be another account's (another key): its rows wait, never paid twice."""
        submitted = chunk.submitted_at or 0.0
        if chunk.base_url == SIMULATED or now() - submitted > RETENTION_SECONDS:
            log.warning(
                "batch %s is no longer known to %s (batches are kept 30 days): its %s rows are sent "
                "again", chunk.batch_id, self.service, f"{chunk.lines:,}",
            )  # fmt: skip
            self.store.close(chunk.name, ABANDONED)
            return
        log.warning(
            "batch %s, submitted %s, is unknown to %s (%s): its %s rows stay pending; run with the "
            "API key that submitted it (they are sent again 30 days after submission)",
            chunk.batch_id, _utc(submitted), self.service, exc, f"{chunk.lines:,}",
        )  # fmt: skip

    async def collect(self, chunk: Chunk, remote: RemoteBatch) -> None:
        """Every row of an ended batch into the journal, in one commit, its files read as they
        stream; then its files go. A row with two result lines keeps its answer if it has one."""
        rows = {r.key: r for r in self.store.rows(chunk.name)}
        bad_lines = {e["line"]: e for e in remote.errors if isinstance(e.get("line"), int)}
        files = [f for f in (chunk.file_id, remote.output_file_id, remote.error_file_id) if f]
        answered: dict[str, bool] = {}  # row key (the line's custom_id) -> the line recorded is an answer
        unreadable = 0
        with self.store.transaction():
            for file_id in filter(None, (remote.output_file_id, remote.error_file_id)):
                async for raw in self.api.lines(file_id):
                    line = read_result_line(raw, chunk.model, remote.id, self.check_json)
                    if line is None:
                        unreadable += 1
                        continue
                    row, ok = rows.get(line.custom_id), line.result.status == "ok"
                    if row is None or answered.get(row.key) or (row.key in answered and not ok):
                        continue
                    self.journal.record(row.key, row.request_hash, line.final, line.result)
                    answered[row.key] = ok
            for row in rows.values():
                if row.key not in answered:
                    line = unanswered(row, remote, bad_lines, chunk.model, self.settings.fallback, unreadable)
                    self.journal.record(row.key, row.request_hash, line.final, line.result)
            self.store.close(chunk.name, COLLECTED)
            self.store.to_free(files, self.service)
        self.collected_now.add(remote.id)
        if unreadable:
            log.warning("%s lines of batch %s's result files could not be read", f"{unreadable:,}", remote.id)
        log.info(
            "collected batch %s (%s): %s of %s rows answered", remote.id, remote.status,
            f"{sum(answered.values()):,}", f"{len(rows):,}",
        )  # fmt: skip
        for file_id in files:
            await self.free(file_id)

    async def free(self, file_id: str) -> None:
        try:
            await self.api.delete(file_id)
        except FatalAPIError as exc:  # storage is the account's, not a row's: say so, go on
            log.warning("could not delete file %s (%s); the next run tries again", file_id, exc)
            self.store.to_free([file_id], self.service)
            return
        self.store.freed(file_id)

    # -- 2. submit ---------------------------------------------------------------------------
    def leftover(self, entry: Entry | None) -> bool:
        """An entry of a batch line that did not run or failed transiently."""
        return entry is not None and not entry.final and entry.result.get("billing_mode") == BATCH

    def to_submit(self, row: PlannedRow, held: dict[str, str | None]) -> bool:
        if row.problem is not None or row.earlier is not None or row.key in held:
            return False
        if self.leftover(row.last):
            assert row.last is not None
            again = self.settings.fallback == "batch" or (
                self.settings.fallback == "none" and self.retry_errors
            )
            return again and row.last.result.get("batch_id") not in self.collected_now
        return True

    async def submit(self, batches: Iterable[Batch]) -> None:
        chunk = ChunkFile(self.output)
        try:
            offset = 0
            for frame, raw in batches:
                if self.stopping():
                    break
                planned = plan_rows(
                    frame, raw, offset, self.config, self.spec, id_column=self.id_column,
                    endpoint=self.endpoint, lookup=self.journal.lookup, retry_errors=self.retry_errors,
                )  # fmt: skip
                held = self.store.held([row.key for row in planned])
                for row in planned:
                    if self.stopping():
                        break
                    if self.to_submit(row, held):
                        await self.add(chunk, row)
                offset += frame.height
            if chunk.rows and not self.stopping():
                await self.seal(chunk)
        finally:
            chunk.discard()

    async def add(self, chunk: ChunkFile, row: PlannedRow) -> None:
        assert row.body is not None
        body = row.body
        try:
            if self.spec.may_have_images and has_local(body):
                body = await asyncio.to_thread(materialize, body)
        except (OSError, ValueError) as exc:
            self.record_problem(row, RowProblem("batchgen.ImageNotFound", str(exc)), final=False)
            return
        line = request_line(row.key, body)
        problem = line_problem(line)
        if problem is not None:
            self.record_problem(row, problem, final=True)
            return
        worst = Decimal(0)
        if self.budget is not None:
            worst = self.budget.worst_case(self.config.model, self.config.dialect.messages(body), batch=True)
            if not self.budget.fits(chunk.worst + worst):
                if chunk.rows:
                    await self.seal(chunk)
                if not self.budget.fits(worst):
                    self.budget.refused = worst
                    self.control.stop("budget")
                    return
        if not chunk.fits(len(line)):
            await self.seal(chunk)
        chunk.append(line, ChunkRow(len(chunk.rows) + 1, row.key, row.digest), worst)

    def record_problem(self, row: PlannedRow, problem: RowProblem, *, final: bool) -> None:
        result = RowResult(
            status=ERROR, model=self.config.model, error_code=problem.code,
            error_message=problem.message, attempts=0, finished_at=utc_now(),
        )  # fmt: skip
        self.journal.record(row.key, row.digest, final, result)

    async def seal(self, chunk: ChunkFile) -> None:
        """Record the chunk, upload it, record the file, create the batch, record the batch."""
        digest = chunk.digest.hexdigest()[:12]
        name = f"batchgen-{self.store.journal_id}-{len(self.store.names()) + 1:05d}-{digest}"
        record = Chunk(
            name, self.config.model, len(chunk.rows), chunk.size, self.settings.window,
            base_url=self.base_url, workspace=self.config.workspace,
        )  # fmt: skip
        if self.budget is not None:
            self.budget.commit(chunk.worst)  # before the upload: a crash after it overspends nothing
        self.store.add(record, chunk.rows)
        self.mine.add(name)
        file_id = await self.api.upload(f"{name}.jsonl", chunk.close())
        self.store.set_file(name, file_id, now())
        metadata = {"ds_name": name, "ds_description": f"batchgen {self.output.name}"}
        self.submitted += len(chunk.rows)
        try:
            remote: RemoteBatch | None = await self.api.create(file_id, self.settings.window, metadata)
        except LostAnswer:
            remote = await self.created_from(name, file_id)
        if remote is None:  # never sent twice by one run: within the grace, a lookup is all it gets
            self.told.add(name)
            self.store.create_lost(name, now())
            log.warning(
                "the Batch API did not answer the create of %s and lists no batch of it yet: its %s "
                "rows stay pending; the next run looks for it again before sending anything",
                name, f"{len(chunk.rows):,}",
            )  # fmt: skip
        else:
            self.store.set_batch(name, remote.id, remote.status, remote.created_at or time.time())
            log.info("submitted batch %s: %s rows (%s)", remote.id, f"{len(chunk.rows):,}", name)
        chunk.reset()

    # -- 3. wait -----------------------------------------------------------------------------
    async def wait(self) -> None:
        delay = self.settings.poll
        running = await self.settle(resubmit=False)
        while running and not self.stopping():
            log.info("%s", _waiting_line(running))
            await self.pause(delay / self.settings.speed)
            delay = min(delay * 1.5, self.settings.poll_max)
            if not self.stopping():
                running = await self.settle(resubmit=False)
        if running and self.stopping():
            log.warning(
                "stopped waiting: %s batch(es) keep running on the service (none is cancelled); "
                "run the same command again to collect them", len(running),
            )  # fmt: skip

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, waking within a second when the run is told to stop."""
        while seconds > 0 and not self.stopping():
            step = min(seconds, 1.0)
            await self.sleep(step)
            seconds -= step

    # -- the output --------------------------------------------------------------------------
    def hold(self, planned: list[PlannedRow]) -> list[tuple[RowResult, bool] | None]:
        """What the pool writes for each row instead of sending it, and whether it counts as
        resumed (paid by an earlier run); None: the pool decides.

        Batch mode sends nothing online but the rows ``--batch-fallback online`` hands over.
        """
        held = self.store.held([row.key for row in planned])
        out: list[tuple[RowResult, bool] | None] = []
        for row in planned:
            out.append(self.held_result(row, held))
        return out

    def held_result(self, row: PlannedRow, held: dict[str, str | None]) -> tuple[RowResult, bool] | None:
        if row.problem is not None:
            return None
        if row.earlier is not None:  # answered: by this run's collection, or before it
            collected_now = row.earlier.result.get("batch_id") in self.collected_now
            return (from_journal(row.earlier), False) if collected_now else None
        if row.key in held:
            return _pending(self.config.model, held[row.key]), False
        if self.settings.fallback == "online" and self.leftover(row.last):
            return None
        if row.last is not None:
            return from_journal(row.last), row.last.result.get("batch_id") not in self.collected_now
        skipped = RowResult(
            SKIPPED, model=self.config.model, attempts=0, error_message="not submitted: the run stopped first"
        )
        return skipped, False


def held_rows(store: BatchStore, model: str) -> Hold:
    """The pool's ``hold`` for a real-time run on a journal with batches not yet collected:
    their rows stay ``pending`` (never sent online while a batch may answer them). Matched by
    row key alone: the real-time body of the same request may be in the native API's shape."""

    def hold(planned: list[PlannedRow]) -> list[tuple[RowResult, bool] | None]:
        held = store.held([row.key for row in planned])
        return [
            (_pending(model, held[row.key]), False)
            if row.problem is None and row.earlier is None and row.key in held
            else None
            for row in planned
        ]

    return hold


def _pending(model: str, batch_id: str | None) -> RowResult:
    """A row in a batch not yet collected (batch_id None: its create is still being looked up)."""
    return RowResult(PENDING, model=model, billing_mode=BATCH, batch_id=batch_id)


def _waiting_line(running: list[RemoteBatch]) -> str:
    done = sum(b.completed + b.failed for b in running)
    total = sum(b.total for b in running)
    phases = ", ".join(sorted({b.status for b in running}))
    return f"waiting on {len(running)} batch(es): {phases}; {done:,}/{total:,} lines done"
