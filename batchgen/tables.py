"""Reading prompt tables and writing answer tables (CSV, Parquet, JSONL).

Every read problem becomes a one-line ``UsageError`` that names the file and the fix. Writes
are atomic: the table goes to a temporary file beside the target, is flushed to disk, then
renamed over it, so a crash never leaves half a file and a failed run never clobbers one.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import json
import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from batchgen.csvshape import NOT_UTF8, check_csv, checked_separator
from batchgen.errors import UsageError

Format = Literal["csv", "parquet", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "parquet", "jsonl")
_EXTENSIONS: dict[str, Format] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def format_of(path: str | os.PathLike[str], override: str | None = None, *, role: str) -> Format:
    """The table format, from ``override`` or the file's extension."""
    if override:
        return override  # type: ignore[return-value]  # click.Choice checked it
    suffix = Path(path).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    known = ", ".join(_EXTENSIONS)
    hint = " or pass --input-format" if role == "input" else ""
    raise UsageError(
        f"cannot tell the {role} format of {path} from its extension "
        f"{suffix or '(none)'!r}: use {known}{hint}"
    )


def _first_bad_utf8(path: Path) -> int | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return offset + exc.start
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        return offset + exc.start
    return None


def _first_bad_jsonl_line(path: Path) -> str | None:
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                return f"line {number} is not valid JSON ({exc.args[0].split(':')[0]})"
            if not isinstance(value, dict):
                return f"line {number} is not a JSON object"
    return None


def _input(path: str | os.PathLike[str], fmt: str | None) -> tuple[Path, Format]:
    """The input's path and format, or why it cannot be read at all."""
    path = Path(path)
    found = format_of(path, fmt, role="input")
    if not path.exists():
        raise UsageError(f"input file not found: {path}")
    if path.is_dir():
        raise UsageError(f"input {path} is a directory, not a file")
    return path, found


def read_table(
    path: str | os.PathLike[str], fmt: str | None = None, *, separator: str | None = None
) -> pl.DataFrame:
    """Read a whole input table; CSV cells stay strings so nothing is reinterpreted."""
    path, fmt = _input(path, fmt)
    sniff = separator != ","  # a comma the user chose: trust it, one column or not
    separator = checked_separator("," if separator is None else separator)
    try:
        if fmt == "csv":
            check_csv(path, separator, sniff=sniff)
            frame = pl.read_csv(path, infer_schema=False, encoding="utf8", separator=separator)
            # Spreadsheet exports often start with a byte-order mark; it is not part of the name.
            if frame.columns and frame.columns[0].startswith("\ufeff"):
                frame = frame.rename({frame.columns[0]: frame.columns[0].lstrip("\ufeff")})
        elif fmt == "parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_ndjson(path, infer_schema_length=None)
    except UsageError:
        raise
    except pl.exceptions.NoDataError:
        raise UsageError(f"input {path} is empty: it has no header and no rows") from None
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise _read_error(path, fmt, exc) from None
    if frame.height == 0:
        raise UsageError(f"input {path} has no rows (columns: {', '.join(frame.columns) or 'none'})")
    return frame


def _read_error(path: Path, fmt: str, exc: Exception) -> UsageError:
    if fmt == "csv":
        offset = _first_bad_utf8(path)
        if offset is not None:
            return UsageError(NOT_UTF8.format(path=path, offset=offset))
    if fmt == "jsonl":
        if path.stat().st_size == 0:
            return UsageError(f"input {path} is empty: it has no rows")
        problem = _first_bad_jsonl_line(path)
        if problem:
            return UsageError(f"input {path}: {problem}; fix that line or remove it")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UsageError(f"cannot read {path} as {fmt}: {first_line}")


def check_writable(path: str | os.PathLike[str]) -> None:
    """Make sure the output can be written *before* any money is spent producing it."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output {path} is a directory: give a file name, e.g. {path}/answers.csv")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write the output {path}: {exc.strerror or exc}") from None


def _flatten_for_text(frame: pl.DataFrame, fmt: Format) -> pl.DataFrame:
    """CSV holds no lists, structs or bytes (JSONL no bytes): write them as JSON / base64 text."""
    columns = []
    for name, dtype in frame.schema.items():
        column = frame.get_column(name)
        if dtype == pl.Binary:
            column = column.bin.encode("base64")
        elif fmt == "csv" and isinstance(dtype, pl.Struct):
            column = frame.select(pl.col(name).struct.json_encode()).to_series()
        elif fmt == "csv" and isinstance(dtype, pl.List | pl.Array):
            column = pl.Series(
                name,
                [
                    None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                    for v in column.to_list()
                ],
                dtype=pl.String,
            )
        columns.append(column)
    return pl.DataFrame(columns)


def _new_file_mode(path: Path) -> int:
    """Keep an existing output's permissions; a new one gets the usual 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def metadata_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar that carries a CSV or JSONL output's metadata (Parquet keeps it inside)."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """What ``write_table(metadata=...)`` recorded with an output; {} if nothing was."""
    path = Path(path)
    try:
        if format_of(path, role="input") == "parquet":
            found = pl.read_parquet_metadata(path)
            return {k[len("batchgen.") :]: v for k, v in found.items() if k.startswith("batchgen.")}
        return dict(json.loads(metadata_path(path).read_text("utf-8")))
    except (OSError, ValueError, UsageError, pl.exceptions.PolarsError):
        return {}


def write_atomically(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode(path))  # mkstemp makes it 0600; readers downstream need more
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def write_table(
    frame: pl.DataFrame,
    path: str | os.PathLike[str],
    fmt: Format | None = None,
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``frame`` atomically: temporary file, fsync, rename over ``path``.

    ``metadata`` goes into Parquet's key-value metadata (keys prefixed ``batchgen.``), or for
    CSV and JSONL into a ``.meta.json`` sidecar written just before the table.
    """
    path = Path(path)
    fmt = fmt or format_of(path, role="output")
    if fmt != "parquet":
        frame = _flatten_for_text(frame, fmt)
        if metadata is not None:
            text = json.dumps(metadata, indent=2, ensure_ascii=False).encode() + b"\n"
            write_atomically(metadata_path(path), lambda f: f.write(text))
        writer = frame.write_csv if fmt == "csv" else frame.write_ndjson
        write_atomically(path, writer)
        return
    kv = {f"batchgen.{k}": v for k, v in (metadata or {}).items()}
    write_atomically(path, lambda f: frame.write_parquet(f, metadata=kv or None))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- streaming: tables larger than memory -----------------------------------------------------
DEFAULT_BATCH_ROWS = 4096


@dataclass
class Source:
    """An input table read in batches: its shape up front, its rows on demand, in order."""

    path: Path
    fmt: Format
    total: int
    schema: pl.Schema
    _scan: pl.LazyFrame = field(repr=False)
    messages_column: str | None = None

    @property
    def columns(self) -> list[str]:
        return list(self.schema)

    def column_stats(self, column: str) -> tuple[int, Any | None, int]:
        """(nulls, one duplicated value or None, how often it appears), streamed."""
        col = pl.col(column)
        nulls, dup = (
            self._scan.select(
                col.null_count().alias("nulls"), col.filter(col.is_duplicated()).first().alias("dup")
            )
            .collect()
            .row(0)
        )
        count = self._scan.select((col == dup).sum()).collect().item() if dup is not None else 0
        return nulls, dup, count

    def batches(self, rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[pl.DataFrame, list[Any] | None]]:
        """Each batch, with the messages cells exactly as written when the input is JSONL."""
        raw = self._raw_messages() if self.messages_column else None
        if self.fmt == "parquet":
            # Slices read only the row groups they need; collect_batches decodes ahead, which
            # costs memory in proportion to the file.
            chunks: Iterator[pl.DataFrame] = (
                self._scan.slice(offset, rows).collect() for offset in range(0, self.total, rows)
            )
        else:
            chunks = self._scan.collect_batches(chunk_size=rows, maintain_order=True)
        for batch in chunks:
            if batch.height == 0:
                continue
            cells = [next(raw) for _ in range(batch.height)] if raw is not None else None
            yield batch, cells

    def _raw_messages(self) -> Iterator[Any]:
        with self.path.open("rb") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line).get(self.messages_column)

    def head(self, rows: int) -> pl.DataFrame:
        return self._scan.head(rows).collect()


def _jsonl_rows(path: Path) -> int:
    """Count a JSONL file's rows, failing on the first line that is not a JSON object."""
    problem = _first_bad_jsonl_line(path)
    if problem:
        raise UsageError(f"input {path}: {problem}; fix that line or remove it")
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def open_source(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    limit: int | None = None,
    messages_column: str | None = None,
    separator: str | None = None,
) -> Source:
    """Open an input table for streaming; every read problem is a ``UsageError`` *now*.

    The whole file is checked before the first request (for CSV: UTF-8, each row's cell count
    and each quote, in one pass; every line for JSONL; the footer for Parquet), so a bad row
    900,000 cannot stop a run that has been paying. ``separator`` is the CSV's one-character
    separator (``"\\t"``, as typed in a shell, means a tab; default a comma, and a one-column
    header holding ``;`` or a tab is refused as a sign of another separator).
    """
    path, fmt = _input(path, fmt)
    sniff = separator != ","  # a comma the user chose: trust it, one column or not
    separator = checked_separator("," if separator is None else separator)
    try:
        if fmt == "csv":
            check_csv(path, separator, sniff=sniff)
            scan = pl.scan_csv(path, infer_schema=False, encoding="utf8", separator=separator)
            first = scan.collect_schema().names()[0] if scan.collect_schema().names() else ""
            if first.startswith("\ufeff"):  # a spreadsheet's byte-order mark is not in the name
                scan = scan.rename({first: first.lstrip("\ufeff")})
        elif fmt == "parquet":
            scan = pl.scan_parquet(path)
        else:
            if path.stat().st_size == 0:
                raise UsageError(f"input {path} is empty: it has no rows")
            _jsonl_rows(path)
            scan = pl.scan_ndjson(path, infer_schema_length=None)
        schema = scan.collect_schema()
        if limit is not None:
            scan = scan.head(limit)
        total = scan.select(pl.len()).collect().item()
    except UsageError:
        raise
    except pl.exceptions.NoDataError:
        raise UsageError(f"input {path} is empty: it has no header and no rows") from None
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise _read_error(path, fmt, exc) from None
    if total == 0:
        raise UsageError(f"input {path} has no rows (columns: {', '.join(schema) or 'none'})")
    column = messages_column if fmt == "jsonl" and messages_column in schema else None
    return Source(path, fmt, total, schema, scan, column)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_memory() -> None:
    """Hand freed heap back to the OS after each batch.

    glibc keeps what a batch's many small buffers (request bodies, replies, polars chunks on
    several threads) freed, and over a million rows the process grows by ~80 MB per million
    rows without holding a single object more; trimming after each batch keeps it flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class TableWriter:
    """Writes an output table batch by batch into a temporary file, then renames it into place.

    CSV and JSONL batches are appended to the temporary file. Parquet batches stream through
    polars' ``sink_parquet`` running in a thread behind a small queue (one row group per
    16K rows), so neither format holds more than a couple of batches in memory. Nothing is
    visible at the target until ``commit``; ``discard`` removes every trace. ``metadata`` goes
    into Parquet's key-value metadata, or a ``.meta.json`` sidecar for CSV and JSONL.
    """

    def __init__(
        self, directory: Path, name: str, fmt: Format, metadata: dict[str, str] | None = None
    ) -> None:
        self.fmt = fmt
        self.metadata = metadata
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        self._tmp = Path(tmp)
        self._file: Any = os.fdopen(fd, "wb")
        self._first = True
        self._queue: queue.Queue[pl.DataFrame | None] | None = None
        self._sink: threading.Thread | None = None
        self._sink_error: BaseException | None = None

    def _start_sink(self, schema: pl.Schema) -> None:
        from polars.io.plugins import register_io_source

        self._file.close()  # polars writes the file itself
        self._queue = queue.Queue(maxsize=2)
        batches = self._queue

        def source(*_: Any) -> Iterator[pl.DataFrame]:
            while (batch := batches.get()) is not None:
                yield batch

        kv = {f"batchgen.{k}": v for k, v in (self.metadata or {}).items()}
        frames = register_io_source(io_source=source, schema=schema)

        def sink() -> None:
            try:
                frames.sink_parquet(self._tmp, metadata=kv or None, row_group_size=DEFAULT_BATCH_ROWS * 4)
            except BaseException as exc:  # reported by commit
                self._sink_error = exc

        self._sink = threading.Thread(target=sink, name="batchgen-parquet-sink", daemon=True)
        self._sink.start()

    def _put(self, item: pl.DataFrame | None) -> None:
        assert self._queue is not None and self._sink is not None
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._sink.is_alive():  # the sink failed: commit reports why
                    return

    def write(self, frame: pl.DataFrame) -> None:
        if self.fmt == "parquet":
            if self._sink is None:
                self._start_sink(frame.schema)
            self._put(frame)
        elif self.fmt == "csv":
            _flatten_for_text(frame, "csv").write_csv(self._file, include_header=self._first)
        else:
            _flatten_for_text(frame, "jsonl").write_ndjson(self._file)
        self._first = False
        release_memory()

    def _finish(self) -> None:
        if self._sink is not None:
            self._put(None)
            self._sink.join()
            if self._sink_error is not None:
                raise self._sink_error
        elif not self._file.closed:
            self._file.flush()
            self._file.close()

    def commit(self, target: Path) -> None:
        """Make the written rows ``target``, atomically, with the metadata."""
        self._finish()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(self._tmp, _new_file_mode(target))
        if self.fmt != "parquet" and self.metadata is not None:
            text = json.dumps(self.metadata, indent=2, ensure_ascii=False).encode() + b"\n"
            write_atomically(metadata_path(target), lambda f: f.write(text))
        os.replace(self._tmp, target)
        _fsync_dir(target.parent)

    def discard(self) -> None:
        with contextlib.suppress(BaseException):
            self._finish()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)
