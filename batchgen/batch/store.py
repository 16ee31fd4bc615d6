"""What batch mode keeps in the journal: which rows went into which file and which batch.

Two tables beside the journal's ``rows``. A chunk is recorded with its rows *before* its file
is uploaded; the file id is recorded before the batch is created and the batch id right after,
so a run killed at any instant leaves one of four states the next run can settle without
paying twice (``batch.mode``): formed (nothing on the service), uploaded (a batch may exist:
look it up by the chunk's name), submitted (poll it), collected (its rows are in ``rows``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from batchgen.errors import UsageError
from batchgen.journal import Journal

T = TypeVar("T")

FORMED, UPLOADED, SUBMITTED = "formed", "uploaded", "submitted"
COLLECTED, ABANDONED = "collected", "abandoned"

_COLUMNS = (
    "name, model, lines, bytes, window, state, file_id, batch_id, remote_status, base_url, workspace, "
    "create_sent_at, submitted_at"
)  # Chunk's fields, in order
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
    base_url TEXT NOT NULL,
    workspace TEXT,
    create_sent_at REAL,
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
CREATE TABLE IF NOT EXISTS batch_files_to_free (file_id TEXT PRIMARY KEY, service TEXT NOT NULL);
"""
SIMULATED = "simulate"  # the base URL recorded for a --simulate run's chunks: gone with that run
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
    base_url: str = ""  # where its file and batch live (SIMULATED: --simulate's own simulator)
    workspace: str | None = None
    create_sent_at: float | None = None  # unix time of the last create sent, by this machine's clock
    submitted_at: float | None = None  # unix time of the create: the batch's created_at

    @property
    def service(self) -> str:
        return service_name(self.base_url, self.workspace)


def service_name(base_url: str, workspace: str | None) -> str:
    """A service as messages name it: the base URL, and the workspace if one is set."""
    if base_url == SIMULATED:
        return "--simulate's simulator"
    return base_url + (f" (workspace {workspace})" if workspace else "")


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
        _check_layout(self._db)
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
                f"INSERT INTO batch_chunks ({_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                (chunk.name, chunk.model, chunk.lines, chunk.bytes, chunk.window, FORMED, None, None, None,
                 chunk.base_url, chunk.workspace, None, None),
            )  # fmt: skip
            self._db.executemany(
                "INSERT INTO batch_rows VALUES (?, ?, ?, ?)",
                [(chunk.name, r.line, r.key, r.request_hash) for r in rows],
            )

    def set_file(self, name: str, file_id: str, create_sent_at: float) -> None:
        """The file is uploaded and its create about to be sent."""
        self._db.execute(
            "UPDATE batch_chunks SET file_id = ?, state = ?, create_sent_at = ? WHERE name = ?",
            (file_id, UPLOADED, create_sent_at, name),
        )

    def create_lost(self, name: str, at: float) -> None:
        """A create went unanswered at ``at``: a lookup finds its batch only some time after."""
        self._db.execute("UPDATE batch_chunks SET create_sent_at = ? WHERE name = ?", (at, name))

    def set_batch(self, name: str, batch_id: str, remote_status: str, created_at: float) -> None:
        self._db.execute(
            "UPDATE batch_chunks SET batch_id = ?, state = ?, remote_status = ?, submitted_at = ? "
            "WHERE name = ?",
            (batch_id, SUBMITTED, remote_status, float(created_at), name),
        )

    def set_remote_status(self, name: str, remote_status: str) -> None:
        self._db.execute("UPDATE batch_chunks SET remote_status = ? WHERE name = ?", (remote_status, name))

    def close(self, name: str, state: str) -> None:
        """``COLLECTED`` (results recorded) or ``ABANDONED`` (never became a batch): its rows
        are free to go again."""
        self._db.execute("UPDATE batch_chunks SET state = ? WHERE name = ?", (state, name))
        if state == ABANDONED:
            self._db.execute("DELETE FROM batch_rows WHERE chunk = ?", (name,))

    def forget_simulated(self) -> int:
        """Abandon the open chunks of earlier --simulate runs (their simulator is gone); how many."""
        names = [c.name for c in self.chunks(open_only=True) if c.base_url == SIMULATED]
        for name in names:
            self.close(name, ABANDONED)
        return len(names)

    # -- the account's storage ---------------------------------------------------------------
    def to_free(self, file_ids: list[str], service: str) -> None:
        """Files to delete once their results are recorded (in the same commit as those)."""
        self._db.executemany(
            "INSERT OR IGNORE INTO batch_files_to_free VALUES (?, ?)", [(f, service) for f in file_ids]
        )

    def freed(self, file_id: str) -> None:
        self._db.execute("DELETE FROM batch_files_to_free WHERE file_id = ?", (file_id,))

    def unfreed(self, service: str) -> list[str]:
        """Files of ``service`` a run recorded to delete and did not (stopped, or refused)."""
        query = "SELECT file_id FROM batch_files_to_free WHERE service = ? ORDER BY rowid"
        return [f for (f,) in self._db.execute(query, (service,))]

    def chunks(self, *, open_only: bool = False) -> list[Chunk]:
        return _chunks(self._db, open_only=open_only)

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


def _chunks(db: sqlite3.Connection, *, open_only: bool) -> list[Chunk]:
    where = f" WHERE state IN ({','.join('?' * len(OPEN_STATES))})" if open_only else ""
    query = f"SELECT {_COLUMNS} FROM batch_chunks{where} ORDER BY rowid"
    return [Chunk(*row) for row in db.execute(query, OPEN_STATES if open_only else ())]


def read_chunks(path: Path, *, open_only: bool = False) -> list[Chunk]:
    """A journal's chunks, read without its lock and without writing (``batch list``,
    ``--dry-run``, ``--fresh``'s check): empty if no batch-mode run wrote that journal. The
    journal is in WAL mode, so this never waits for a run writing it."""
    return _read(path, lambda db: _chunks(db, open_only=open_only), [])


def read_held_keys(path: Path) -> set[str]:
    """The keys of rows in chunks not yet collected, read as :func:`read_chunks` reads."""
    query = (
        "SELECT r.key FROM batch_rows r JOIN batch_chunks c ON c.name = r.chunk "
        f"WHERE c.state IN ({','.join('?' * len(OPEN_STATES))}) AND c.base_url != '{SIMULATED}'"
    )  # a --simulate run's batches ended with it: the next run sends their rows
    return _read(path, lambda db: {key for (key,) in db.execute(query, OPEN_STATES)}, set())


def _read(path: Path, read: Callable[[sqlite3.Connection], T], empty: T) -> T:
    """``read`` on a read-only connection; ``empty`` if no batch-mode run wrote the journal.
    A journal that cannot be read is an error, never "no batches": money depends on it."""
    if not path.exists():
        return empty
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise UsageError(f"cannot open {path} ({exc}): check its permissions") from None
    with contextlib.closing(connection) as db:
        try:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'batch_chunks'").fetchone():
                return empty
        except sqlite3.DatabaseError:  # not a database at all: nothing can be known of its batches
            return empty  # (the run says it is not a journal; --fresh replaces it)
        try:
            _check_layout(db)
            return read(db)
        except sqlite3.DatabaseError as exc:
            raise UsageError(
                f"cannot read the batches {path} records ({exc}): if none of them is still running, "
                "delete it to start over"
            ) from None


def _check_layout(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(batch_chunks)")}
    if "create_sent_at" not in columns:
        raise UsageError(
            "this journal's batch tables were written by a pre-release batchgen: collect or cancel its "
            "batches with that version, or delete the journal if none is running"
        )


def refuse_forgetting(output: Path, path: Path) -> None:
    """``--fresh`` forgets the journal: never while a batch may still answer (and bill) rows."""
    running = [c for c in read_chunks(path, open_only=True) if c.base_url != SIMULATED]
    if running:
        rows = sum(c.lines for c in running)
        raise UsageError(
            f"{output} has {rows:,} rows in {len(running)} batch(es) not yet collected, which --fresh "
            f"would forget (and pay for again): run with --batch to collect them first "
            f"(`batchgen batch cancel {output}` stops them)"
        )
