"""``batchgen run --engine ray``: the rows still to answer go to Ray actors, the output is batchgen's.

Before the run's own pass (``commands/run.py``), under the output's lock:

1. every actor journal in ``--journal-dir`` is merged into the output's journal (an answer
   beats an error for the same request), so rows finished by any earlier run, on any node,
   are known;
2. the rows the journal does not answer are planned exactly as a run plans them (same key,
   same request hash) and become a ``ray.data.Dataset`` carrying their key;
3. :func:`batchgen.ray.answer_dataset` answers them on the cluster, each actor journalling its
   rows as they finish; the actors' journals are merged again and then removed.

The run's own pass then finds every row in the journal and writes the output in input order
with batchgen's writer, exactly as a resumed run does; a row the actors left unanswered (a
fault that outlasted its retries) is sent by that pass, as any resumed run would send it.
A driver killed at any point loses only the requests in flight: the next run merges what the
actors journalled and sends only the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import polars as pl

from batchgen.config import RunConfig
from batchgen.errors import BatchgenError, UsageError
from batchgen.journal import Journal
from batchgen.planning import plan_rows
from batchgen.prompts import PromptSpec
from batchgen.tables import Source

log = logging.getLogger("batchgen")

KEY_COLUMN = "__batchgen_key"
_MERGE = """
INSERT INTO rows SELECT key, request_hash, status, final, result FROM actor.rows WHERE true
ON CONFLICT (key, request_hash) DO UPDATE SET
    status = excluded.status, final = excluded.final, result = excluded.result
WHERE rows.status != 'ok'
"""


def default_journal_dir(output: Path) -> Path:
    return output.with_name(output.name + ".ray-journals")


def merge_actor_journals(journal: Journal, directory: Path) -> None:
    """Move every actor journal's rows into ``journal``, then remove the actor journal."""
    for path in sorted(directory.glob("actor-*.sqlite")):
        db = journal.connection
        try:
            db.execute("ATTACH DATABASE ? AS actor", (str(path),))
        except sqlite3.Error as exc:
            raise UsageError(f"{path} is not a batchgen actor journal ({exc}): move it away") from None
        try:
            with contextlib.suppress(sqlite3.OperationalError):  # an actor that died before its schema
                db.execute("BEGIN")
                db.execute(_MERGE)
                db.execute("COMMIT")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.execute("DETACH DATABASE actor")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")


def rows_to_send(
    source: Source, config: RunConfig, spec: PromptSpec, journal: Journal, *, id_column: str | None,
    endpoint: str, retry_errors: bool,
) -> pl.DataFrame:  # fmt: skip
    """The input rows the journal does not answer, with their journal key in ``KEY_COLUMN``."""
    parts, offset = [], 0
    for frame, raw in source.batches():
        planned = plan_rows(
            frame, raw, offset, config, spec, id_column=id_column, endpoint=endpoint,
            lookup=journal.lookup, retry_errors=retry_errors,
        )  # fmt: skip
        offset += frame.height
        send = [i for i, row in enumerate(planned) if row.earlier is None and row.problem is None]
        if send:
            keys = pl.Series(KEY_COLUMN, [planned[i].key for i in send])
            parts.append(frame[send].with_columns(keys))
    return pl.concat(parts) if parts else pl.DataFrame()


def run_on_ray(
    source: Source, config: RunConfig, spec: PromptSpec, journal: Journal, *, output: Path,
    journal_dir: Path | None, address: str | None, actors: int, id_column: str | None, endpoint: str,
    retry_errors: bool,
) -> None:  # fmt: skip
    """Steps 1 to 3 of the module docstring (``prepare`` checked the options); the run's own
    pass does the rest."""
    ray = _import_ray()
    directory = journal_dir or default_journal_dir(output)
    directory.mkdir(parents=True, exist_ok=True)
    merge_actor_journals(journal, directory)
    todo = rows_to_send(
        source, config, spec, journal, id_column=id_column, endpoint=endpoint, retry_errors=retry_errors
    )
    if todo.height == 0:
        return
    from batchgen.ray import BATCH_ROWS, answer_dataset

    started_here = not ray.is_initialized()
    if started_here:
        _init(ray, address)
    try:
        # One block per actor call, so that every actor gets work.
        blocks = [todo.slice(i, BATCH_ROWS).to_arrow() for i in range(0, todo.height, BATCH_ROWS)]
        log.info("sending %s rows through %d Ray actors", f"{todo.height:,}", actors)
        answered = answer_dataset(
            ray.data.from_arrow(blocks), config, spec, key_column=KEY_COLUMN, journal_dir=directory,
            actors=max(1, min(actors, len(blocks))), endpoint=endpoint, retry_errors=retry_errors,
        )  # fmt: skip
        started, done, ok = time.monotonic(), 0, 0
        try:  # the answers are in the actors' journals; the output is written from them
            for batch in answered.iter_batches(batch_size=None, batch_format="pyarrow"):
                table: Any = batch  # a pyarrow.Table, as batch_format asks
                done += table.num_rows
                ok += table.column("status").to_pylist().count("ok")
        except ray.exceptions.RayError as exc:
            merge_actor_journals(journal, directory)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BatchgenError(
                f"the Ray job stopped ({type(exc).__name__}: {reason[:200]}); every row it finished is "
                f"kept in {journal.path}: run the same command again to send only the rest"
            ) from None
        log.info(
            "Ray actors answered %s rows (%s ok) in %.1fs; the line below counts the rest of the run "
            "(batchgen cost OUTPUT prices them all)", f"{done:,}", f"{ok:,}", time.monotonic() - started,
        )  # fmt: skip
    finally:
        if started_here:
            ray.shutdown()
    merge_actor_journals(journal, directory)


def _import_ray():
    try:
        import ray
        import ray.data
        import ray.exceptions
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'batchgen[ray]'") from None
    return ray


def _init(ray, address: str | None) -> None:
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` runs here), or start one
    on this machine, on loopback, with no dashboard."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(
                include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                _node_ip_address="127.0.0.1",
            )  # fmt: skip
    for name in ("ray", "ray.data"):  # Ray Data's progress lines would bury batchgen's
        logging.getLogger(name).setLevel(logging.WARNING)
