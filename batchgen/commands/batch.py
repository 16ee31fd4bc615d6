"""``batchgen batch list|status|cancel OUTPUT``: the batches an output's journal holds.

``list`` reads the journal only; ``status`` asks the service about each batch not yet
collected; ``cancel`` asks it to cancel them (rows it finished are kept and collected by the
next run; the others follow ``--batch-fallback``). None of them writes the output.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchgen.batch.remote import BatchAPI, RemoteBatch
from batchgen.batch.store import OPEN_STATES, SIMULATED, SUBMITTED, Chunk, read_chunks
from batchgen.config import ENV_API_KEY, ENV_OPENAI_KEY, RunConfig, api_key_from_env, resolve_base_url
from batchgen.errors import UsageError
from batchgen.journal import journal_path

log = logging.getLogger("batchgen")


@dataclass(frozen=True)
class BatchTarget:
    """Whose batches: the output, and the service if not the one each batch was submitted to
    (``--base-url`` / ``--region`` / ``--workspace``; the journal records each batch's)."""

    output: Path
    base_url: str | None = None
    region: str | None = None
    workspace: str | None = None

    def config(self, key: str, chunk: Chunk) -> RunConfig:
        url = self.base_url or (
            resolve_base_url(None, self.region, environ={}, api="openai") if self.region else chunk.base_url
        )
        return RunConfig(api_key=key, base_url=url, api="openai", workspace=self.workspace or chunk.workspace)


def _key() -> str:
    key = api_key_from_env("openai")
    if not key:
        raise UsageError(
            f"no API key: set {ENV_API_KEY} (or {ENV_OPENAI_KEY}) to the key that submitted the batches"
        )
    return key


def _chunks(output: Path) -> list[Chunk]:
    path = journal_path(output)
    if not path.exists():
        raise UsageError(f"no journal beside {output} ({path}): no batch-mode run wrote that output")
    return read_chunks(path)


def _line(chunk: Chunk, remote: RemoteBatch | None = None) -> str:
    where = chunk.batch_id or "(no batch yet)"
    if remote is None:
        state = chunk.remote_status or chunk.state
        return f"{where}  {chunk.state:<9}  {state:<11}  {chunk.lines:>7,} rows  {chunk.name}"
    counts = (
        f"{remote.completed:,} done, {remote.failed:,} failed of {remote.total:,}"
        if remote.total
        else "no line counts yet"
    )
    return f"{where}  {remote.status:<11}  {counts}  {chunk.name}"


def batch_list(output: Path, echo: Callable[[str], None] = print) -> int:
    chunks = _chunks(output)
    for chunk in chunks:
        echo(_line(chunk))
    if not chunks:
        echo(f"no batches in {journal_path(output)}")
    return 0


def batch_status(target: BatchTarget, echo: Callable[[str], None] = print) -> int:
    return asyncio.run(_remote(target, cancel=False, echo=echo))


def batch_cancel(target: BatchTarget, echo: Callable[[str], None] = print) -> int:
    return asyncio.run(_remote(target, cancel=True, echo=echo))


async def _remote(target: BatchTarget, *, cancel: bool, echo: Callable[[str], None]) -> int:
    chunks = [c for c in _chunks(target.output) if c.state in OPEN_STATES]
    if not chunks:
        echo(f"no batch of {target.output} is waiting to be collected")
        return 0
    key, asked = _key(), 0
    for chunk in chunks:
        if chunk.base_url == SIMULATED:
            echo(_line(chunk) + "  (on --simulate's simulator, gone with its run)")
        elif chunk.state != SUBMITTED or chunk.batch_id is None:  # no batch id recorded (yet)
            echo(_line(chunk) + "  (the next batchgen run --batch looks it up)")
        else:
            async with BatchAPI(target.config(key, chunk)) as api:  # few batches: a client each
                remote = await api.retrieve(chunk.batch_id)
                if cancel and not remote.ended and remote.status != "cancelling":  # asked once is enough
                    remote = await api.cancel(chunk.batch_id)
                    asked += 1
            echo(_line(chunk, remote))
    if asked:
        log.info(
            "cancel asked of %s batch(es); run the same batchgen run command to collect what they finished",
            asked,
        )
    return 0
