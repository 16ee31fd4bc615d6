"""The tables beside an output: a stopped run's ``.partial-`` table, the ``.replaced-`` copy of
another request set's output, which of those the output holds again, and the swap itself."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from batchgen.errors import BatchgenError, UsageError
from batchgen.tables import metadata_path, read_metadata

# What an output records of the run that wrote it; a run that differs in one of these writes
# a different table, so an existing one is kept aside rather than silently replaced.
REQUEST_SET = ("input", "rows", "model", "endpoint")


def check_output_folder(output: Path) -> None:
    """The output's folder exists and is writable, or its nearest existing parent is."""
    if output.is_dir():
        raise UsageError(f"output {output} is a directory: give a file name, e.g. {output}/answers.csv")
    folder = output.parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the output {output}: {folder} is not writable")


def beside(output: Path, kind: str) -> Path:
    """A new name next to ``output``: ``NAME.<kind>-<UTC time>.EXT``, never an existing file's."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        name = output.with_name(f"{output.stem}.{kind}-{stamp}{f'-{n}' if n > 1 else ''}{output.suffix}")
        if not name.exists():
            return name
    raise BatchgenError(f"too many {kind} tables beside {output}: remove some")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then are delivered as they came.

    A Python-level handler, not a blocked mask: the polars and HTTP threads alive by now
    would take a blocked signal with its default action. Python runs handlers on the main
    thread whichever thread the kernel picked.
    """
    caught: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda number, _frame: caught.append(number)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for number in caught:
            signal.raise_signal(number)


def _other_request_set(recorded: Mapping[str, str], metadata: Mapping[str, str]) -> list[str]:
    """What a table recorded that this run's table would not hold: another input, model or
    endpoint, or more rows (a full table about to be replaced by a --limit run's)."""
    differs = [k for k in ("input", "model", "endpoint") if recorded.get(k) and recorded[k] != metadata[k]]
    rows = recorded.get("rows", "")
    if rows.isdigit() and int(rows) > int(metadata["rows"]):
        differs.append("rows")
    return differs


def _held_by(recorded: Mapping[str, str], metadata: Mapping[str, str]) -> bool:
    """Whether a table's answers are all in the journal and this run's rows: it recorded its
    whole request set (a table without one, or from before batchgen kept one, may hold the
    only copy of an answer) and it is not another set."""
    return all(recorded.get(k) for k in REQUEST_SET) and not _other_request_set(recorded, metadata)


def keep_other_request_set(output: Path, metadata: Mapping[str, str]) -> tuple[Path, str] | None:
    """An existing output written for another input, model or endpoint, or with more rows, is
    renamed ``NAME.replaced-<UTC time>.EXT`` (with its sidecar) before this run's table takes
    its place."""
    if not output.exists():
        return None
    recorded = read_metadata(output)
    differs = _other_request_set(recorded, metadata)
    if not differs:
        return None
    kept = beside(output, "replaced")
    os.replace(output, kept)
    with contextlib.suppress(FileNotFoundError):
        os.replace(metadata_path(output), metadata_path(kept))
    what = ", ".join(f"{k} {recorded[k]}" for k in differs)
    return kept, what


def remove_superseded(output: Path, metadata: Mapping[str, str]) -> None:
    """Tables beside ``output`` that it now holds again: the ``.partial-`` tables of stopped runs
    and the ``.replaced-`` copies of the same request set, no larger (every answer they held is
    in the journal, so in ``output``), and sidecars left without their table. Tables of another
    request set, or that recorded none, may hold answers ``output`` lacks: they stay."""
    stem, suffix = glob.escape(output.stem), glob.escape(output.suffix)
    for kind in ("partial", "replaced"):
        for table in output.parent.glob(f"{stem}.{kind}-*{suffix}"):
            if not _held_by(read_metadata(table), metadata):
                continue
            for path in (table, metadata_path(table)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for sidecar in output.parent.glob(f"{stem}.{kind}-*.meta.json"):
            if not sidecar.with_name(sidecar.name.removesuffix(".meta.json")).exists():
                with contextlib.suppress(FileNotFoundError):
                    sidecar.unlink()
