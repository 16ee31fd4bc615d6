"""The library's entry points: a prompt table in, the same table with answers out.

``run_frame`` / ``arun_frame`` answer an in-memory table; ``arun_batches`` streams batches
from any source to any writer (the CLI's path). Rows are sent by the worker pool
(``batchgen.pool``), paced at ``rpm`` requests per minute, and every input row comes back
exactly once, in input order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import polars as pl

from batchgen.budget import Budget
from batchgen.config import RunConfig
from batchgen.journal import Journal
from batchgen.planning import Batch, PlannedRow
from batchgen.pool import Pool, PoolOptions, RunControl
from batchgen.pricing import PriceTable
from batchgen.prompts import PromptSpec
from batchgen.ratelimit import Pacing
from batchgen.results import OUTPUT_COLUMNS, RowResult, RunResult, RunStats, check_collisions, results_frame

if TYPE_CHECKING:
    import httpx


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
    clock: Callable[[], float] = time.monotonic,
    transport: httpx.AsyncBaseTransport | None = None,
    hold: Callable[[list[PlannedRow]], list[tuple[RowResult, bool] | None]] | None = None,
    governor: Pacing | None = None,
) -> RunResult:
    """Answer ``total`` rows arriving in ``batches``, handing each batch, answered, to ``write``.

    Batches go to ``write`` in input order, each once all its rows have finished; at most
    ``pool.BATCHES_AHEAD`` are held at a time, so memory does not grow with the table. With a
    ``journal`` (opened, locked), rows it holds for the same request are taken from it instead
    of being sent (permanent row errors too, unless ``retry_errors``) and every row that
    finishes is recorded at once; rows are keyed by ``id_column`` or their row number, and
    a journalled answer counts only for the same ``endpoint`` (default: the base URL), so a
    simulated answer is never taken for a real one.
    ``control`` stops the run from outside; a ``budget`` stops it before it could be
    overspent. ``sleep`` and ``clock`` are the pacing's and the retries' time (tests pass a
    fake one); ``transport`` replaces the default aiohttp-backed httpx transport. ``hold``
    (batch mode) gives, per batch of planned rows, the result of each row that must not be
    sent (pending in a batch, collected from one), None for the rest. ``governor`` paces the run
    instead of its own (one shared by several runs: ``batchgen.sharedrate.SharedGovernor``).
    """
    options = PoolOptions(
        write=write, id_column=id_column, endpoint=endpoint, journal=journal, retry_errors=retry_errors,
        control=control, prices=prices, budget=budget, progress=progress, sleep=sleep, clock=clock,
        transport=transport, hold=hold, governor=governor,
    )  # fmt: skip
    return await Pool(total, config, spec, options).run(batches)


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
