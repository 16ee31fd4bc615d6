"""Jobs on Ray: a ``ray.data.Dataset`` of prompts to answered rows, by batchgen's own client.

    import ray, batchgen.ray
    from batchgen.config import RunConfig
    ds = ray.data.read_parquet("s3://bucket/prompts/")       # a "prompt" column, and an "id"
    answered = batchgen.ray.answer_dataset(ds, RunConfig(api_key=...), key_column="id",
                                           journal_dir="/shared/journals")
    answered.write_parquet("s3://bucket/answers/")            # Ray's order, Ray's files

Each actor runs batchgen's async pool over its batches (retries, pacing, per-row errors: a bad
row is an error row, never a failed task), records every finished row in its own journal in
``journal_dir`` (``actor-<id>.sqlite``: one writer per file, so shared storage is safe) and
takes its slots from one budget for the whole job: the Redis store of ``config.rate_store``,
else a named Ray actor. A row whose key is answered in a journal of ``journal_dir`` for the
same request is taken from it, not sent. Ray neither keeps the input order nor resumes
without resending: ``batchgen run --engine ray`` (``batchgen.commands.rayrun``) filters finished
rows before building the dataset and writes the output itself, in input order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import ray
import ray.data

from batchgen.config import RunConfig
from batchgen.journal import Answers, Journal, lookup_in
from batchgen.prompts import PromptSpec
from batchgen.ratelimit import Pacing
from batchgen.ray.budget import ActorStore, budget_actor
from batchgen.redisstore import open_store
from batchgen.runner import arun
from batchgen.sharedrate import SharedGovernor

__all__ = ["answer_dataset"]

BATCH_ROWS = 512  # rows per actor call: enough to keep -c requests in flight through one batch


class _ActorJournal(Journal):
    """An actor's own journal, which also answers from the journals earlier actors left beside it."""

    def __init__(self, path: Path, directory: Path) -> None:
        super().__init__(path)
        self._earlier: list[sqlite3.Connection] = []
        for other in sorted(directory.glob("actor-*.sqlite")):
            with contextlib.suppress(sqlite3.Error):  # an actor that died before its schema
                db = sqlite3.connect(f"file:{other}?mode=ro", uri=True, check_same_thread=False)
                db.execute("SELECT key FROM rows LIMIT 1")
                self._earlier.append(db)

    def lookup(self, keys: list[str]) -> dict[str, Answers]:
        found = super().lookup(keys)
        for db in self._earlier:
            lookup_in(db, keys, found)
        return found


class _Answerer:
    """One Ray actor: a journal of its own and the job's budget; answers one batch per call."""

    def __init__(
        self, config: RunConfig, spec: PromptSpec, journal_dir: str, key_column: str, endpoint: str,
        retry_errors: bool, budget: Any,
    ) -> None:  # fmt: skip
        self.config, self.spec, self.key_column = config, spec, key_column
        self.endpoint, self.retry_errors, self.budget = endpoint, retry_errors, budget
        self.member = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        directory = Path(journal_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.journal = _ActorJournal(directory / f"actor-{uuid.uuid4().hex}.sqlite", directory)
        self.journal.open()

    def __call__(self, batch: Any) -> Any:
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        answered = asyncio.run(self._answer(frame))
        return answered.to_arrow()

    def _governor(self) -> Pacing:
        config = self.config
        if config.rate_store:
            store = open_store(config.rate_store, config.effective_rate_key)
        else:
            store = ActorStore(self.budget, self.member)
        return SharedGovernor(store, config.rpm, config.tpm, adaptive=config.adaptive)

    async def _answer(self, frame: pl.DataFrame) -> pl.DataFrame:
        governor = self._governor()
        try:
            result = await arun(
                frame, self.config, self.spec, id_column=self.key_column, endpoint=self.endpoint,
                journal=self.journal, retry_errors=self.retry_errors, governor=governor,
            )  # fmt: skip
        finally:
            await governor.aclose()  # type: ignore[attr-defined]
        assert result.frame is not None
        return result.frame


def answer_dataset(
    ds: ray.data.Dataset,
    config: RunConfig,
    spec: PromptSpec = PromptSpec(),
    *,
    key_column: str,
    journal_dir: str | os.PathLike[str],
    actors: int = 2,
    endpoint: str | None = None,
    retry_errors: bool = False,
    batch_rows: int = BATCH_ROWS,
) -> ray.data.Dataset:
    """``ds`` with batchgen's output columns added to every row (lazily: Ray runs it when consumed).

    ``key_column`` names each row's stable key (a row's journal key; unique, as ``--id-column``).
    ``actors`` actors each keep ``config.concurrency`` requests in flight, all within one
    ``config.rpm``/``config.tpm`` budget.
    """
    budget = None if config.rate_store else budget_actor(config.effective_rate_key)
    arguments = {
        "config": config, "spec": spec, "journal_dir": str(journal_dir), "key_column": key_column,
        "endpoint": endpoint or config.base_url, "retry_errors": retry_errors, "budget": budget,
    }  # fmt: skip
    return ds.map_batches(
        _Answerer,
        fn_constructor_kwargs=arguments,
        batch_size=batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
