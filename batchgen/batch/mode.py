"""Batch mode's one idempotent pass over a run: settle, collect, submit, (wait); then the pool
writes the output, taking every row from the journal or holding it as ``pending``.

1. Settle what the journal says is on the service (``store``): a chunk formed but never
   uploaded is dropped; one uploaded whose batch id was not recorded is looked up by its name
   (the batch's ``metadata.ds_name``) before anything is sent again; a batch that has ended is
   collected: every row of its chunk gets a journal entry (answered, refused, never run, or
   missing from both files), in one commit, and its files are deleted.
2. Submit every row that needs an answer and is in no open batch, in chunks of at most 50,000
   lines and 500 MB, written to a temporary file beside the output (memory stays flat) and
   named after their content, so a rerun rebuilds the same files.
3. With ``wait``, poll (60 s, backing off to 5 min) until no batch is open, collecting each.

A row inside a batch that has not ended is never sent again, online or in another batch. Rows
a batch ended without running go in a new batch on the next run (``fallback="batch"``), are
sent online by this run (``"online"``) or stay errors (``"none"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from batchgen.batch.lines import (
    BATCH,
    MAX_FILE_BYTES,
    MAX_LINES,
    LineResult,
    line_problem,
    read_result_line,
    request_line,
)
from batchgen.batch.remote import BatchAPI, LostAnswer, RemoteBatch
from batchgen.batch.store import ABANDONED, COLLECTED, FORMED, UPLOADED, BatchStore, Chunk, ChunkRow
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
MISSING = "batchgen.BatchLineMissing"


@dataclass(frozen=True)
class BatchSettings:
    """How batch mode runs: ``--batch-window``, ``--wait``, ``--batch-fallback``."""

    window: str = "24h"
    wait: bool = False
    fallback: str = "batch"
    poll: float = 60.0  # first wait between polls under --wait, then x1.5 up to poll_max
    poll_max: float = 300.0
    speed: float = 1.0  # the simulator's batch clock speed: waits are divided by it


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
    submitted: int = 0

    def __post_init__(self) -> None:
        self.store = BatchStore(self.journal)
        self.check_json = reply_checker(self.config.parameters, self.config.json_schema)

    def stopping(self) -> bool:
        return self.control.stopping

    async def prepare(self, batches: Iterable[Batch]) -> None:
        """Settle, collect, submit, and with ``wait`` poll until every batch has ended."""
        await self.settle()
        if not self.stopping():
            await self.submit(batches)
        if self.settings.wait:
            await self.wait()

    # -- 1. settle ---------------------------------------------------------------------------
    async def settle(self) -> list[RemoteBatch]:
        """Every open chunk brought up to date; the batches still running."""
        for file_id in self.store.unfreed():  # a run stopped between a commit and its deletes
            await self.free(file_id)
        running = []
        for chunk in self.store.chunks(open_only=True):
            remote = await self.settle_chunk(chunk)
            if remote is not None and not remote.ended:
                running.append(remote)
        return running

    async def settle_chunk(self, chunk: Chunk) -> RemoteBatch | None:
        if chunk.state == FORMED:  # killed before its upload was recorded: no batch can exist
            for file_id in await self.api.files_named(f"{chunk.name}.jsonl"):
                await self.free(file_id)  # an upload whose answer never came
            self.store.close(chunk.name, ABANDONED)
            return None
        if chunk.state == UPLOADED:  # killed between upload and create: did the create happen?
            found = await self.api.find(chunk.name)
            if not found:
                await self.api.delete(chunk.file_id or "")
                self.store.close(chunk.name, ABANDONED)
                return None
            self.store.set_batch(chunk.name, found[0].id, found[0].status)
            chunk = replace(chunk, batch_id=found[0].id)
        assert chunk.batch_id is not None
        try:
            remote = await self.api.retrieve(chunk.batch_id)
        except FatalAPIError as exc:
            if exc.http_status != 404:
                raise
            # Past the service's 30 days, or another server (each --simulate run has its own).
            log.warning(
                "batch %s is unknown to %s (%s): its %s rows are sent again",
                chunk.batch_id, self.config.base_url, exc, f"{chunk.lines:,}",
            )  # fmt: skip
            self.store.close(chunk.name, ABANDONED)
            return None
        self.store.set_remote_status(chunk.name, remote.status)
        if remote.ended:
            await self.collect(chunk, remote)
        return remote

    async def collect(self, chunk: Chunk, remote: RemoteBatch) -> None:
        """Every row of an ended batch into the journal, in one commit; then its files go."""
        rows = {r.custom_id: r for r in self.store.rows(chunk.name)}
        found: dict[str, LineResult] = {}
        for file_id in (remote.output_file_id, remote.error_file_id):
            if file_id:
                async for raw in self.api.lines(file_id):
                    line = read_result_line(raw, chunk.model, remote.id, self.check_json)
                    if line is not None and line.custom_id in rows:
                        found[line.custom_id] = line
        bad_lines = {e["line"]: e for e in remote.errors if isinstance(e.get("line"), int)}
        files = [f for f in (chunk.file_id, remote.output_file_id, remote.error_file_id) if f]
        with self.store.transaction():
            for row in rows.values():
                line = found.get(row.custom_id) or _unanswered(row, remote, bad_lines, chunk.model)
                self.journal.record(row.key, row.request_hash, line.final, line.result)
            self.store.close(chunk.name, COLLECTED)
            self.store.to_free(files)
        self.collected_now.add(remote.id)
        answered = sum(1 for line in found.values() if line.result.status == "ok")
        log.info(
            "collected batch %s (%s): %s of %s rows answered", remote.id, remote.status,
            f"{answered:,}", f"{len(rows):,}",
        )  # fmt: skip
        for file_id in files:
            await self.free(file_id)

    async def free(self, file_id: str) -> None:
        try:
            await self.api.delete(file_id)
        except FatalAPIError as exc:  # storage is the account's, not a row's: say so, go on
            log.warning("could not delete file %s (%s); delete it in the console", file_id, exc)
        self.store.freed(file_id)

    # -- 2. submit ---------------------------------------------------------------------------
    def leftover(self, entry: Entry | None) -> bool:
        """An entry of a batch line that did not run or failed transiently."""
        return entry is not None and not entry.final and entry.result.get("billing_mode") == BATCH

    def to_submit(self, row: PlannedRow, held: dict[tuple[str, str], str | None]) -> bool:
        if row.problem is not None or row.earlier is not None or (row.key, row.digest) in held:
            return False
        if self.leftover(row.last):
            assert row.last is not None
            return (
                self.settings.fallback == "batch"
                and row.last.result.get("batch_id") not in self.collected_now
            )
        return True

    async def submit(self, batches: Iterable[Batch]) -> None:
        chunk = _ChunkFile(self.output)
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

    async def add(self, chunk: _ChunkFile, row: PlannedRow) -> None:
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
        chunk.append(line, ChunkRow(len(chunk.rows) + 1, row.key, row.key, row.digest), worst)

    def record_problem(self, row: PlannedRow, problem: RowProblem, *, final: bool) -> None:
        result = RowResult(
            status=ERROR, model=self.config.model, error_code=problem.code,
            error_message=problem.message, attempts=0, finished_at=utc_now(),
        )  # fmt: skip
        self.journal.record(row.key, row.digest, final, result)

    async def seal(self, chunk: _ChunkFile) -> None:
        """Record the chunk, upload it, record the file, create the batch, record the batch."""
        digest = chunk.digest.hexdigest()[:12]
        name = f"batchgen-{self.store.journal_id}-{len(self.store.names()) + 1:05d}-{digest}"
        record = Chunk(name, self.config.model, len(chunk.rows), chunk.size, self.settings.window)
        if self.budget is not None:
            self.budget.commit(chunk.worst)  # before the upload: a crash after it overspends nothing
        self.store.add(record, chunk.rows)
        file_id = await self.api.upload(f"{name}.jsonl", chunk.close())
        self.store.set_file(name, file_id)
        metadata = {"ds_name": name, "ds_description": f"batchgen {self.output.name}"}
        try:
            remote = await self.api.create(file_id, self.settings.window, metadata)
        except LostAnswer:
            remote = await self.created_after_all(name, file_id, metadata)
        self.store.set_batch(name, remote.id, remote.status)
        self.submitted += len(chunk.rows)
        log.info("submitted batch %s: %s rows (%s)", remote.id, f"{len(chunk.rows):,}", name)
        chunk.reset()

    async def created_after_all(self, name: str, file_id: str, metadata: dict[str, str]) -> RemoteBatch:
        """A create whose answer was lost: the batch it made, else one more create."""
        found = await self.api.find(name)
        if found:
            return found[0]
        try:
            return await self.api.create(file_id, self.settings.window, metadata)
        except LostAnswer:
            raise FatalAPIError(
                f"the Batch API did not answer two creates of {name}: run the same command again "
                "later; it looks the batch up before sending anything again"
            ) from None

    # -- 3. wait -----------------------------------------------------------------------------
    async def wait(self) -> None:
        delay = self.settings.poll
        running = await self.settle()
        while running and not self.stopping():
            log.info("%s", _waiting_line(running))
            await self.pause(delay / self.settings.speed)
            delay = min(delay * 1.5, self.settings.poll_max)
            running = await self.settle()

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

    def held_result(
        self, row: PlannedRow, held: dict[tuple[str, str], str | None]
    ) -> tuple[RowResult, bool] | None:
        if row.problem is not None:
            return None
        if row.earlier is not None:  # answered: by this run's collection, or before it
            collected_now = row.earlier.result.get("batch_id") in self.collected_now
            return (from_journal(row.earlier), False) if collected_now else None
        if (row.key, row.digest) in held:
            batch_id = held[(row.key, row.digest)]
            return RowResult(PENDING, model=self.config.model, billing_mode=BATCH, batch_id=batch_id), False
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
        held = {key: batch_id for (key, _), batch_id in store.held([row.key for row in planned]).items()}
        return [
            (RowResult(PENDING, model=model, billing_mode=BATCH, batch_id=held[row.key]), False)
            if row.problem is None and row.earlier is None and row.key in held
            else None
            for row in planned
        ]

    return hold


def _unanswered(row: ChunkRow, remote: RemoteBatch, bad_lines: dict[int, Any], model: str) -> LineResult:
    """A row of an ended batch with no result line: refused by validation, or missing."""
    error = bad_lines.get(row.line)
    if error is not None:  # the service named this line: the same line would fail again
        code, message, final = str(error.get("code") or "invalid_line"), str(error.get("message")), True
    elif remote.status == "failed":
        first = remote.errors[0] if remote.errors else {}
        code = "batch_failed"
        message = f"the batch failed validation ({first.get('message') or 'no detail'}); sent again"
        final = False
    else:
        code, final = MISSING, False
        message = f"batch {remote.id} ended ({remote.status}) with no result line for this row; sent again"
    result = RowResult(
        status=ERROR, model=model, error_code=code, error_message=message, attempts=0,
        billing_mode=BATCH, batch_id=remote.id, finished_at=utc_now(),
    )  # fmt: skip
    return LineResult(row.custom_id, result, final)


def _waiting_line(running: list[RemoteBatch]) -> str:
    done = sum(b.completed + b.failed for b in running)
    total = sum(b.total for b in running)
    phases = ", ".join(sorted({b.status for b in running}))
    return f"waiting on {len(running)} batch(es): {phases}; {done:,}/{total:,} lines done"


class _ChunkFile:
    """The chunk being built: its lines in a temporary file beside the output, its rows."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(f".{output.name}.batch.tmp")
        self.rows: list[ChunkRow] = []
        self.reset()

    def reset(self) -> None:
        self.rows = []
        self.size = 0
        self.worst = Decimal(0)  # --max-cost: the most its lines can cost
        self.digest = hashlib.sha256()
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed by close/discard)

    def fits(self, size: int) -> bool:
        return len(self.rows) < MAX_LINES and self.size + size <= MAX_FILE_BYTES

    def append(self, line: bytes, row: ChunkRow, worst: Decimal) -> None:
        self.worst += worst
        self.file.write(line)
        self.digest.update(line)
        self.size += len(line)
        self.rows.append(row)

    def close(self) -> Path:
        self.file.close()
        return self.path

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
