"""What batch mode keeps in the journal: which rows went into which file and which batch.

Two tables beside the journal's ``rows``. A chunk is recorded with its rows *before* its file
is uploaded; the file id is recorded before the batch is created and the batch id right after,
so a run killed at any instant leaves one of four states the next run can settle without
paying twice (``batch.mode``): formed (nothing on the service), uploaded (a batch may exist:
look it up by the chunk's name), submitted (poll it), collected (its rows are in ``rows``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from batchgen.journal import Journal

FORMED, UPLOADED, SUBMITTED = "formed", "uploaded", "submitted"
COLLECTED, ABANDONED = "collected", "abandoned"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_chunks (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    window TEXT NOT NULL,
    state TEXT NOT NULL,
    file_id TEXT,
    batch_id TEXT,
    remote_status TEXT,
    service TEXT NOT NULL,
    submitted_at REAL
);
CREATE TABLE IF NOT EXISTS batch_rows (
    chunk TEXT NOT NULL,
    line INTEGER NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    PRIMARY KEY (chunk, line)
);
CREATE INDEX IF NOT EXISTS batch_rows_key ON batch_rows (key);
CREATE TABLE IF NOT EXISTS batch_files_to_free (file_id TEXT PRIMARY KEY);
"""
OPEN_STATES = (FORMED, UPLOADED, SUBMITTED)  # a chunk whose rows may still be answered by its batch


@dataclass(frozen=True, slots=True)
class Chunk:
    """One input file of batch mode, and how far it got."""

    name: str  # also the batch's metadata.ds_name, so a lost create can be found by it
    model: str
    lines: int
    bytes: int
    window: str
    state: str = FORMED
    file_id: str | None = None
    batch_id: str | None = None
    remote_status: str | None = None
    service: str = ""  # where its file and batch live: base URL and workspace (``BatchRun.service``)
    submitted_at: float | None = None  # unix time of the create, by this machine's clock


@dataclass(frozen=True, slots=True)
class ChunkRow:
    line: int  # 1-based, as the service's validation errors count
    key: str  # the row's key, also its line's custom_id
    request_hash: str


class BatchStore:
    """The batch tables of one open, locked journal."""

    def __init__(self, journal: Journal) -> None:
        self._db = journal.connection
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('journal_id', ?)", (uuid.uuid4().hex[:16],))
        (self.journal_id,) = self._db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One commit for many writes: a chunk's rows, or a collected batch's results."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- chunks ------------------------------------------------------------------------------
    def add(self, chunk: Chunk, rows: list[ChunkRow]) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT INTO batch_chunks VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, NULL)",
                (chunk.name, chunk.model, chunk.lines, chunk.bytes, chunk.window, FORMED, chunk.service),
            )
            self._db.executemany(
                "INSERT INTO batch_rows VALUES (?, ?, ?, ?)",
                [(chunk.name, r.line, r.key, r.request_hash) for r in rows],
            )

    def set_file(self, name: str, file_id: str) -> None:
        self._db.execute(
            "UPDATE batch_chunks SET file_id = ?, state = ? WHERE name = ?", (file_id, UPLOADED, name)
        )

    def set_batch(self, name: str, batch_id: str, remote_status: str, created_at: float) -> None:
        self._db.execute(
            "UPDATE batch_chunks SET batch_id = ?, state = ?, remote_status = ?, submitted_at = ? "
            "WHERE name = ?",
            (batch_id, SUBMITTED, remote_status, created_at, name),
        )

    def set_remote_status(self, name: str, remote_status: str) -> None:
        self._db.execute("UPDATE batch_chunks SET remote_status = ? WHERE name = ?", (remote_status, name))

    def close(self, name: str, state: str) -> None:
        """``COLLECTED`` (results recorded) or ``ABANDONED`` (never became a batch): its rows
        are free to go again."""
        self._db.execute("UPDATE batch_chunks SET state = ? WHERE name = ?", (state, name))
        if state == ABANDONED:
            self._db.execute("DELETE FROM batch_rows WHERE chunk = ?", (name,))

    # -- the account's storage ---------------------------------------------------------------
    def to_free(self, file_ids: list[str]) -> None:
        """Files to delete once their results are recorded (in the same commit as those)."""
        self._db.executemany("INSERT OR IGNORE INTO batch_files_to_free VALUES (?)", [(f,) for f in file_ids])

    def freed(self, file_id: str) -> None:
        self._db.execute("DELETE FROM batch_files_to_free WHERE file_id = ?", (file_id,))

    def unfreed(self) -> list[str]:
        """Files a run recorded to delete and was stopped before deleting."""
        return [f for (f,) in self._db.execute("SELECT file_id FROM batch_files_to_free ORDER BY rowid")]

    def chunks(self, *, open_only: bool = False) -> list[Chunk]:
        where = f" WHERE state IN ({','.join('?' * len(OPEN_STATES))})" if open_only else ""
        query = f"SELECT * FROM batch_chunks{where} ORDER BY rowid"
        return [Chunk(*row) for row in self._db.execute(query, OPEN_STATES if open_only else ())]

    def names(self) -> set[str]:
        return {name for (name,) in self._db.execute("SELECT name FROM batch_chunks")}

    def rows(self, name: str) -> list[ChunkRow]:
        query = "SELECT line, key, request_hash FROM batch_rows WHERE chunk = ? ORDER BY line"
        return [ChunkRow(*row) for row in self._db.execute(query, (name,))]

    # -- rows --------------------------------------------------------------------------------
    def held(self, keys: list[str]) -> dict[str, str | None]:
        """Key -> batch id (None before its create) of the ``keys`` that sit in a chunk not yet
        collected: those rows are never sent online or in another batch, whatever their request
        is now (a changed prompt waits for the batch holding the old one)."""
        found: dict[str, str | None] = {}
        marks = ",".join("?" * len(OPEN_STATES))
        for start in range(0, len(keys), 900):
            chunk = keys[start : start + 900]
            query = (
                "SELECT r.key, c.batch_id FROM batch_rows r JOIN batch_chunks c "
                f"ON c.name = r.chunk WHERE c.state IN ({marks}) AND r.key IN ({','.join('?' * len(chunk))})"
            )
            found.update(self._db.execute(query, (*OPEN_STATES, *chunk)))
        return found
