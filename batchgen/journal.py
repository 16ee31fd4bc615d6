"""The run journal: every finished row, recorded durably the moment it finishes.

A SQLite database in WAL mode beside the output (``answers.csv`` -> ``answers.csv.journal``).
Each finished row is recorded with its row key, a hash of the exact request (model, route,
messages, parameters) and the row's output columns. A run groups the rows that finish close
together into one transaction, committed at most ``COMMIT_WINDOW`` (50 ms) after the first of
them finished (one commit per row cost more CPU than the HTTP exchange at thousands of rows a
second), so a run killed at any instant, even with ``kill -9``, loses at most the requests that
were in flight and the rows finished in the last 50 ms. The next run of the same command reads
it back: rows already answered for the same request are not sent (or paid for) again, and the
output is rebuilt from it.

``synchronous=NORMAL`` makes a commit a write to the WAL without an fsync: it survives the
process dying at any point, which is the failure that matters here; only a power cut can lose
the last rows' records (and then costs a re-send, never a wrong row).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import operator
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from batchgen.errors import BatchgenError, ExitCode, UsageError

SCHEMA_VERSION = "2"
COMMIT_WINDOW = 0.05  # seconds a finished row may wait for its commit while a run groups them
COMMIT_ROWS = 2000  # and at most this many rows per commit

# One row per (row key, request): every answer paid for is kept, so a run that switches the
# model, a parameter or the endpoint and then switches back takes the earlier answers again.
_ROWS = """
CREATE TABLE IF NOT EXISTS rows (
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    final INTEGER NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (key, request_hash)
);
"""
_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);" + _ROWS
# Schema 1 kept one row per key, each new request replacing the last answer.
_MIGRATE_1 = f"""
ALTER TABLE rows RENAME TO rows_v1;
{_ROWS}
INSERT INTO rows SELECT key, request_hash, status, final, result FROM rows_v1;
DROP TABLE rows_v1;
UPDATE meta SET value = '2' WHERE key = 'schema';
"""


class LockedError(BatchgenError):
    """Another batchgen run is writing the same output."""

    exit_code = ExitCode.LOCKED


_INSERT = "INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?)"


class GroupCommitError(Exception):
    """Rows recorded in a group could not be committed (disk full, ...)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")


def journal_path(output: str | os.PathLike[str]) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".journal")


def lock_path(journal: Path) -> Path:
    """The lock file beside a journal (``OUTPUT.journal.lock``)."""
    return journal.with_name(journal.name + ".lock")


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


def request_hash(body: Mapping[str, Any], endpoint: str = "") -> str:
    """A stable digest of what a request asks for, and of whom; any change means a new request."""
    canonical = _CANONICAL({"endpoint": endpoint, "body": body})
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """A journalled row: the request it answered and its output columns."""

    request_hash: str
    status: str
    final: bool  # a permanent outcome: ok, or an error sending it again would repeat
    result: dict[str, Any]

    def answers(self, digest: str, *, retry_errors: bool) -> bool:
        """Whether this entry stands for the request ``digest`` so it need not be sent again."""
        return self.request_hash == digest and (self.status == "ok" or (self.final and not retry_errors))


Answers = dict[str, Entry]  # one row key's journalled answers, by request hash

NEW, CHANGED, RETRY = "new", "changed", "retry"  # why a row is sent


def reuse(answers: Answers | None, digest: str, *, retry_errors: bool) -> tuple[Entry | None, str | None]:
    """The journalled answer that stands for request ``digest``, or why the row must be sent.

    ``(entry, None)``: take ``entry``. ``(None, NEW)``: the row was never sent; ``CHANGED``:
    only other requests of it were (new prompt, model, parameters or endpoint); ``RETRY``:
    this request ended in an error worth sending again.
    """
    if not answers:
        return None, NEW
    entry = answers.get(digest)
    if entry is None:
        return None, CHANGED
    if entry.answers(digest, retry_errors=retry_errors):
        return entry, None
    return None, RETRY


def row_keys(frame: Any, id_column: str | None, offset: int) -> list[str]:
    """A batch's journal keys: its --id-column values, else its row numbers in the table."""
    if id_column:
        return frame.get_column(id_column).cast(str).to_list()
    return [str(offset + i) for i in range(frame.height)]


def _iso(value: Any) -> str:
    """``json.dumps``'s hook for the one non-JSON type of a row's columns, its finish time."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# json.dumps with options builds an encoder per call: this one is built once.
_ROW_ENCODE = json.JSONEncoder(ensure_ascii=False, default=_iso).encode
_COLUMNS: dict[type, tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {}


def _columns_of(kind: type) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]:
    """A result class's field names and one getter for all of them (dataclasses.asdict deep-copies
    each value, and a getattr per field costs as much again, at thousands of rows a second)."""
    found = _COLUMNS.get(kind)
    if found is None:
        names = tuple(field.name for field in dataclasses.fields(kind))
        found = _COLUMNS[kind] = (names, operator.attrgetter(*names))
    return found


def _locked(fd: int, output: str | os.PathLike[str]) -> LockedError:
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
    return LockedError(
        f"another batchgen run (pid {holder}) is writing {output}: wait for it to finish, or give "
        "this run another -o"
    )


def check_unlocked(output: str | os.PathLike[str]) -> None:
    """Raise ``LockedError`` when a run holds ``output``'s lock; create and take nothing."""
    lock_file = lock_path(journal_path(output))
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run has it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked(fd, output) from None
    finally:
        os.close(fd)  # also releases the shared lock taken to look


class Journal:
    """One run's view of the journal: a held lock, a connection, and per-row commits."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None
        self._window = 0.0  # > 0 while ``grouped``: rows wait up to this long for their commit
        self._unwritten: list[tuple[str, str, str, int, str]] = []
        self._oldest = 0.0  # when the first unwritten row finished
        self._timer: asyncio.TimerHandle | None = None
        self._failure: Exception | None = None  # a timed commit that failed, raised by the next call

    # -- lifecycle -------------------------------------------------------------------------
    def clean_leftovers(self, output: str | os.PathLike[str]) -> None:
        """Remove temporary files a killed run left beside ``output`` (the lock is held)."""
        output = Path(output)
        for leftover in output.parent.glob(f".{glob.escape(output.name)}.*"):
            if leftover.name.endswith((".tmp", ".parts")):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        leftover.unlink()
        sidecar = output.with_name(output.name + ".meta.json")
        if sidecar.exists() and not output.exists():  # a write that failed after its sidecar
            with contextlib.suppress(OSError):
                sidecar.unlink()

    def lock(self, output: str | os.PathLike[str]) -> None:
        """Take the output's lock or fail at once: overlapping cron runs must not interleave."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = lock_path(self.path)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _locked(fd, output)
            os.close(fd)
            raise error from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def open(self) -> None:
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            fresh = not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'rows'").fetchone()
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION if fresh else "1",)
            )
            (version,) = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version == "1":
                self._db.executescript(f"BEGIN; {_MIGRATE_1} COMMIT;")
            self._db.execute("SELECT key, request_hash, status, final, result FROM rows LIMIT 1")
        except sqlite3.Error as exc:
            self.close_db()
            raise UsageError(
                f"{self.path} is not a batchgen journal ({exc}): move it away, or "
                "pass --fresh to start this output over"
            ) from None

    def discard(self) -> None:
        """``--fresh``: forget every recorded row (the lock is already held)."""
        self.close_db()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    @property
    def connection(self) -> sqlite3.Connection:
        """The open database, for the tables batch mode keeps beside the rows (``batch.store``)."""
        assert self._db is not None
        return self._db

    def has_rows(self) -> bool:
        assert self._db is not None
        return self._db.execute("SELECT 1 FROM rows LIMIT 1").fetchone() is not None

    def remove_if_empty(self) -> None:
        """A run refused before recording a row leaves no journal or lock file behind."""
        if self._db is not None and self.has_rows():
            return
        self.discard()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(self.path))

    def close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        self.close_db()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- rows ------------------------------------------------------------------------------
    def lookup(self, keys: list[str]) -> dict[str, Answers]:
        """The journalled answers of ``keys`` (a batch's worth: the journal is not loaded whole)."""
        assert self._db is not None
        self.commit()
        return lookup_in(self._db, keys)

    def record(self, key: str, digest: str, final: bool, result: Any) -> None:
        """Record one finished row (``result`` is a RowResult).

        Outside ``grouped`` it is committed (in the WAL) when this returns; inside, within the
        window, with the rows that finish beside it.
        """
        assert self._db is not None
        if self._failure is not None:
            raise self._failure
        names, values = _columns_of(type(result))
        columns = _ROW_ENCODE(dict(zip(names, values(result), strict=True)))
        row = (key, digest, result.status, int(final), columns)
        if not self._window:
            self._db.execute(_INSERT, row)
            return
        self._unwritten.append(row)
        now = time.monotonic()
        if len(self._unwritten) == 1:
            self._oldest = now
            self._timer = asyncio.get_running_loop().call_later(self._window, self._commit_in_time)
        elif now - self._oldest >= self._window or len(self._unwritten) >= COMMIT_ROWS:
            self.commit()  # the timer is late (a busy loop), or the group is large enough

    def commit(self) -> None:
        """Commit the rows recorded and not yet committed, in one transaction."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._unwritten = self._unwritten, []
        if not rows:
            return
        assert self._db is not None
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, rows)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _commit_in_time(self) -> None:
        self._timer = None
        try:
            self.commit()
        except Exception as exc:  # disk full: the run stops at its next record, or at the end
            self._failure = exc

    @contextlib.contextmanager
    def grouped(self, window: float = COMMIT_WINDOW) -> Iterator[None]:
        """Within this block (in an event loop), rows are committed in groups: each within
        ``window`` seconds of finishing; all of them when the block ends, however it ends."""
        self._window = window
        try:
            yield
        except BaseException:
            self._end_group(quiet=True)  # what stopped the block matters more than the commit
            raise
        self._end_group(quiet=False)

    def _end_group(self, *, quiet: bool) -> None:
        self._window = 0.0
        failure, self._failure = self._failure, None
        try:
            self.commit()
        except Exception as exc:
            failure = failure or exc
        if failure is not None and not quiet:
            raise GroupCommitError(failure) from failure


def lookup_in(
    db: sqlite3.Connection, keys: list[str], into: dict[str, Answers] | None = None
) -> dict[str, Answers]:
    """The answers of ``keys`` in the journal ``db``, added to ``into``; an answer ("ok") already
    there is never replaced by another entry for the same request."""
    found: dict[str, Answers] = {} if into is None else into
    for start in range(0, len(keys), 900):  # SQLite's bound-parameter limit is 999
        chunk = keys[start : start + 900]
        marks = ",".join("?" * len(chunk))
        for key, h, status, final, result in db.execute(
            f"SELECT key, request_hash, status, final, result FROM rows WHERE key IN ({marks})", chunk
        ):
            answers = found.setdefault(key, {})
            if h not in answers or answers[h].status != "ok":
                answers[h] = Entry(h, status, bool(final), json.loads(result))
    return found
