"""Progress on stderr: a live line on a terminal, a plain line every few seconds elsewhere."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TextIO

from batchgen.logs import LOGGER, event
from batchgen.results import RunStats

BAR_WIDTH = 24


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _count(n: int) -> str:
    if n < 10_000:
        return f"{n:,}"
    if n < 10_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def status_line(stats: RunStats, *, bar: bool = False) -> str:
    """``123/1,000 rows (12%) · 9.8 rows/s · ETA 1m30s · tokens 1.2k in / 8.9k out · 2 errors``."""
    # Answered rows only: rows skipped because the run is stopping were not done.
    done, total = stats.ok + stats.error, stats.total
    sent = done - stats.resumed  # rows taken from the journal say nothing about speed
    rate = sent / max(stats.elapsed, 1e-9)
    remaining = total - done - stats.skipped
    eta = duration(remaining / rate) if rate > 0 and remaining else ("-" if remaining else "0s")
    share = done / total if total else 1.0
    head = f"{done:,}/{total:,} rows ({share:.0%})"
    if bar:
        filled = int(BAR_WIDTH * share)
        head = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {head}"
    if stats.resumed:
        head += f" ({stats.resumed:,} resumed)"
    errors = f"{stats.error:,} error{'s' if stats.error != 1 else ''}"
    if stats.skipped:
        errors += f" · {stats.skipped:,} skipped"
    return (
        f"{head} · {rate:.1f} rows/s{_admitted(stats)} · ETA {eta} · tokens "
        f"{_count(stats.input_tokens)} in / {_count(stats.output_tokens)} out{_cost(stats)}"
        f" · {errors}"
    )


def _admitted(stats: RunStats) -> str:
    """The rate the governor admits now, and how often the service throttled us."""
    governor = stats.governor
    if governor is None:
        return ""
    text = f" (admitting {governor.admitted_rpm:,.0f} rpm"
    if governor.admitted_tpm is not None:
        text += f", {_count(int(governor.admitted_tpm))} tpm"
    throttled = sum(governor.throttles.values())
    return text + (f", {throttled:,} throttled)" if throttled else ")")


def _cost(stats: RunStats) -> str:
    if not stats.priced:
        return ""
    unpriced = f" + {stats.unpriced_rows:,} unpriced rows" if stats.unpriced_rows else ""
    return f" · ${stats.spent:.4f} spent{unpriced}"


def summary_line(stats: RunStats) -> str:
    """The one line printed at the end of every run."""
    pending = f", {stats.pending:,} pending" if stats.pending else ""
    return (
        f"{stats.total:,} row{'s' if stats.total != 1 else ''}: {stats.ok:,} ok, {stats.error:,} error, "
        f"{stats.skipped:,} skipped{pending} · tokens in {stats.input_tokens:,}, out "
        f"{stats.output_tokens:,}{_cost(stats)} · {stats.elapsed:.1f}s"
    )


class Progress:
    """An async callable for ``arun(progress=...)``: redraws until cancelled."""

    def __init__(
        self, stream: TextIO | None = None, *, live: bool | None = None, interval: float | None = None
    ) -> None:
        stream = stream or sys.stderr
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.interval = interval if interval is not None else (0.25 if self.live else 5.0)
        self._drawn = False

    async def __call__(self, stats: RunStats) -> None:
        # A log line while the bar is drawn would be glued to it: clear the bar first (it is
        # drawn again at the next tick).
        handlers = logging.getLogger(LOGGER).handlers if self.live else []
        for handler in handlers:
            handler.addFilter(self._before_log)
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.draw(stats)
        finally:
            for handler in handlers:
                handler.removeFilter(self._before_log)
            self.clear()

    def _before_log(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True

    def draw(self, stats: RunStats) -> None:
        if self.live:
            self.stream.write("\r\x1b[K" + status_line(stats, bar=True))
            self._drawn = True
        else:
            self.stream.write("batchgen: " + status_line(stats) + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


class JsonProgress:
    """``--log-format json``: a ``progress`` event every ``interval`` seconds, never a bar."""

    def __init__(self, log: logging.Logger, interval: float = 5.0) -> None:
        self.log = log
        self.interval = interval

    async def __call__(self, stats: RunStats) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.log.info(
                "%s",
                status_line(stats),
                extra=event(
                    "progress",
                    done=stats.done,
                    total=stats.total,
                    ok=stats.ok,
                    error=stats.error,
                    resumed=stats.resumed,
                    input_tokens=stats.input_tokens,
                    output_tokens=stats.output_tokens,
                    elapsed_s=round(stats.elapsed, 1),
                    spent_usd=str(stats.spent) if stats.priced else None,
                ),
            )
