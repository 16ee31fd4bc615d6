"""What the progress display prints, on a terminal and off one."""

from __future__ import annotations

import asyncio
import io

from batchgen.progress import Progress, status_line, summary_line
from batchgen.results import RowResult, RunStats


def stats_with(ok: int, error: int, total: int) -> RunStats:
    stats = RunStats(total=total)
    stats.started -= 10  # ten seconds in
    for _ in range(ok):
        stats.add(RowResult(status="ok", input_tokens=100, output_tokens=40, attempts=1))
    for _ in range(error):
        stats.add(RowResult(status="error", error_code="DataInspectionFailed", attempts=1))
    return stats


def test_status_line_has_counts_rate_eta_tokens_and_errors():
    line = status_line(stats_with(ok=18, error=2, total=100))
    assert line == ("20/100 rows (20%) · 2.0 rows/s · ETA 40s · tokens 1,800 in / 720 out · 2 errors")


def test_live_mode_redraws_one_line_with_a_bar_and_clears_it():
    stream = io.StringIO()
    progress = Progress(stream, live=True, interval=0.01)
    stats = stats_with(ok=50, error=0, total=100)

    async def briefly() -> None:
        task = asyncio.create_task(progress(stats))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(briefly())
    text = stream.getvalue()
    assert "\r\x1b[K[############............] 50/100 rows (50%)" in text
    assert "\n" not in text and text.endswith("\r\x1b[K")


def test_plain_mode_writes_whole_lines():
    stream = io.StringIO()
    Progress(stream, live=False).draw(stats_with(ok=3, error=1, total=4))
    assert stream.getvalue() == (
        "batchgen: 4/4 rows (100%) · 0.4 rows/s · ETA 0s · tokens 300 in / 120 out · 1 error\n"
    )


def test_summary_line():
    stats = stats_with(ok=3, error=1, total=5)
    stats.skipped = 1
    stats.finished = stats.started + 2.5
    assert summary_line(stats) == ("5 rows: 3 ok, 1 error, 1 skipped · tokens in 300, out 120 · 2.5s")


def test_skipped_rows_are_not_counted_as_done():
    stats = stats_with(ok=30, error=0, total=100)
    stats.skipped = 70  # Ctrl-C: the rest will not be answered
    assert status_line(stats).startswith("30/100 rows (30%)")
    assert status_line(stats).endswith("0 errors · 70 skipped")


def test_a_log_line_never_lands_on_the_bar():
    import logging

    from batchgen.logs import setup_logging

    stream = io.StringIO()
    log = setup_logging("text", stream=stream)
    progress = Progress(stream, live=True, interval=0.01)
    stats = stats_with(ok=50, error=0, total=100)

    async def warn_while_drawn() -> None:
        task = asyncio.create_task(progress(stats))
        await asyncio.sleep(0.05)
        log.warning("SIGINT: sending no more requests")
        await asyncio.sleep(0.03)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(warn_while_drawn())
    text = stream.getvalue()
    before, _, _ = text.partition("batchgen: warning: SIGINT")
    assert before.endswith("\r\x1b[K")  # the bar was cleared, so the line starts clean
    assert not logging.getLogger("batchgen").handlers[0].filters  # removed once the run ends
