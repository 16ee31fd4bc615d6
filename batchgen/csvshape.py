"""The shape of a CSV input, checked in one streaming pass before anything is sent.

polars reads a CSV in two steps that must agree: it first finds where rows end by counting
every quote as opening or closing a quoted region, then splits each row into cells, where
only a quote at the start of a cell opens one. A row with too many cells fails only when
its batch is read (after money was spent on the ones before), and a quote the two steps
see differently shifts or swallows rows. ``check_csv`` walks the file once, as polars
will, and names the first line where that would happen.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterator
from itertools import repeat
from pathlib import Path

from batchgen.errors import UsageError

NOT_UTF8 = (
    "{path} is not UTF-8 text (first bad byte at offset {offset}): re-save it as UTF-8, "
    "e.g. `iconv -f latin1 -t utf-8 {path} > fixed.csv`"
)
_QUOTE = b'"'
_QUOTED_CELL = re.compile(rb'"[^"]*(?:""[^"]*)*"')  # inside it, "" is a quote
_CHUNK = 1 << 20
_SNIFFED = (";", "\t", ",")  # separators a one-column header gives away


def checked_separator(separator: str) -> str:
    """The CSV separator as polars takes it; the two characters ``\t`` mean a tab."""
    sep = "\t" if separator == "\\t" else separator
    if len(sep) != 1 or not sep.isascii():
        raise UsageError(
            f"the separator must be one ASCII character, e.g. ';' or '|', or '\\t' for a tab; "
            f"got {separator!r}"
        )
    if sep in '"\r\n':
        raise UsageError(f"the separator cannot be {sep!r}: that is a quote or a line break")
    return sep


def _shown_separator(sep: str) -> str:
    return "\\t" if sep == "\t" else sep


def _quoted(text: str) -> str:
    """``text`` in double quotes, or single ones if it holds a double quote; tabs shown as \t."""
    text = text.replace("\t", "\\t")
    if len(text) > 60:
        text = text[:57] + "..."
    return f"'{text}'" if '"' in text else f'"{text}"'


def _text(raw: bytes, limit: int = 40) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _csv_blocks(path: Path) -> Iterator[bytes]:
    """The file in blocks of whole lines (split at ``\n`` only, as polars does), UTF-8 checked.

    Each block is about ``_CHUNK`` bytes and ends, where one is near, at a newline with an even
    number of quotes before it, so that a quoted cell seldom spans two blocks. A leading
    byte-order mark is dropped. Memory is a block plus the longest line.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    pending: list[bytes] = []
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise UsageError(NOT_UTF8.format(path=path, offset=offset + exc.start)) from None
            if offset == 0:
                if b"\n" not in chunk and b"\r" in chunk.rstrip(b"\r"):
                    raise UsageError(
                        f"input {path}: its lines end in a lone carriage return (\\r, old Mac style), "
                        "which is not read as a line break: convert them, e.g. "
                        f"`tr '\\r' '\\n' < {path} > fixed.csv`"
                    )
                offset = len(chunk)
                chunk = chunk.removeprefix(codecs.BOM_UTF8)
            else:
                offset += len(chunk)
            if b"\n" not in chunk:
                pending.append(chunk)
                continue
            if pending:
                chunk = b"".join([*pending, chunk])
                pending = []
            end = _block_end(chunk)
            if end < len(chunk):
                pending.append(chunk[end:])
            yield chunk[:end]
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise UsageError(NOT_UTF8.format(path=path, offset=offset + exc.start)) from None
    if pending:
        yield b"".join(pending)


def _block_end(chunk: bytes) -> int:
    """Just after the last newline of ``chunk`` that has an even number of quotes before it."""
    last = end = chunk.rfind(b"\n") + 1
    for _ in range(8):  # a quoted cell of a few lines; past that, any newline will do
        if chunk.count(_QUOTE, 0, end) % 2 == 0:
            return end
        end = chunk.rfind(b"\n", 0, end - 1) + 1
        if end == 0:
            break
    return last


def check_csv(path: Path, separator: str, *, sniff: bool = True) -> None:
    """One streaming pass over a CSV input: UTF-8, the separator, every row's cells, every quote.

    ``sniff``: a one-column header holding another separator is an error (off when the user
    chose the separator explicitly, so a one-column file whose name holds a ``;`` can be read).
    """
    shape = _CsvShape(path, separator, sniff)
    for block in _csv_blocks(path):
        shape.feed(block)
    shape.finish()


class _CsvShape:
    """The rows of a CSV as polars will split them, fed the file's blocks in order.

    Rows with fewer cells than the header are fine (polars fills them with nulls, as it always
    has); blank lines before the header are skipped, as polars skips them. Most blocks are
    vouched for at C speed; the header's, and any that cannot be, are walked line by line,
    which is also what names the line of a problem.
    """

    def __init__(self, path: Path, separator: str, sniff: bool = True) -> None:
        self.path, self.separator, self.sep = path, separator, separator.encode()
        self.sniff = sniff
        self.header = 0  # cells in the header; 0 until it is read
        self.number = 0  # lines read
        self.cells = 1  # cells so far in the current row
        self.start = 0  # the line the current row starts on
        self.in_quote = False
        self.opened = (0, 0)  # the line the open quoted cell starts on, and where on that line
        self.stray: UsageError | None = None  # a stray quote: fatal if any line follows

    def feed(self, block: bytes) -> None:
        if self.header and not self.in_quote and self.stray is None and self._vouch(block):
            self.number += block.count(b"\n") + (not block.endswith(b"\n"))
            return
        lines = block.split(b"\n")
        if not lines[-1]:
            lines.pop()
        self._walk(lines)

    def _vouch(self, block: bytes) -> bool:
        """Whether every row of ``block`` (which starts a row) is fine, without walking it.

        True when each quote belongs to a quoted cell that opens at the start of a cell and
        closes at its end (each such cell is replaced by a NUL to check that), and no row,
        quoted cells removed, holds as many separators as the header has cells.
        """
        sep = self.sep
        if _QUOTE in block:
            if b"\0" in block:
                return False
            block = _QUOTED_CELL.sub(b"\0", block)
            if _QUOTE in block:
                return False
            cells = block.count(b"\0")
            opening = block.count(sep + b"\0") + block.count(b"\n\0") + block.startswith(b"\0")
            closing = (
                block.count(b"\0" + sep)
                + block.count(b"\0\n")
                + block.count(b"\0\r\n")
                + block.endswith(b"\0")
                + block.endswith(b"\0\r")
            )
            if not opening == closing == cells:
                return False
        return max(map(bytes.count, block.split(b"\n"), repeat(sep))) < self.header

    def _walk(self, lines: list[bytes]) -> None:
        path, separator, sep = self.path, self.separator, self.sep
        header, number, cells, start = self.header, self.number, self.cells, self.start
        in_quote, (opened, opening), stray = self.in_quote, self.opened, self.stray
        for line in lines:
            if stray is not None:
                raise stray
            number += 1
            if not in_quote:
                if not header:
                    if line in (b"", b"\r"):
                        continue
                    if self.sniff:
                        _check_header_separator(path, line, separator)
                start, cells = number, 1
                if _QUOTE not in line:
                    cells += line.count(sep)
                    if header and cells > header:
                        raise _too_many_cells(path, start, number, cells, header, separator)
                    header = header or cells
                    continue
            # Walk the quotes of this line: a quote opens a cell only at the start of one;
            # inside, "" is a quote; the closing quote must end the cell.
            pos = 0
            strays: list[int] = []
            cell_start = not in_quote
            while True:
                q = line.find(_QUOTE, pos)
                if in_quote:
                    if q < 0:
                        break  # the cell goes on to the next line
                    if line[q + 1 : q + 2] == _QUOTE:
                        pos = q + 2
                        continue
                    in_quote, pos = False, q + 1
                    if line[pos : pos + 1] == sep:
                        cells, pos, cell_start = cells + 1, pos + 1, True
                        continue
                    if line[pos:] in (b"", b"\r"):
                        break
                    raise _text_after_quote(path, line, (opened, opening), number, q, sep)
                cells += line.count(sep, pos, len(line) if q < 0 else q)
                if q < 0:
                    break
                if (q == pos and cell_start) or (q > pos and line[q - 1 : q] == sep):
                    in_quote, opened, opening = True, number, q
                else:
                    strays.append(q)
                cell_start, pos = False, q + 1
            if len(strays) % 2:  # polars would take this quote as opening a quoted region
                stray = _stray_quote(path, line, number, strays[-1], sep)
            if not in_quote:
                if header and cells > header:
                    raise _too_many_cells(path, start, number, cells, header, separator)
                header = header or cells
        self.header, self.number, self.cells, self.start = header, number, cells, start
        self.in_quote, self.opened, self.stray = in_quote, (opened, opening), stray

    def finish(self) -> None:
        if self.stray is not None and _ends_in_newline(self.path):  # harmless on a last line only
            raise self.stray
        if self.in_quote:
            raise UsageError(
                f'input {self.path}: the quote (") opened on line {self.opened[0]} is never closed, '
                "so the rest of the file would be one cell: close it, or write a quote inside a "
                'cell as two ("")'
            )


def _ends_in_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _check_header_separator(path: Path, line: bytes, separator: str) -> None:
    """A header of one column holding ``;`` or a tab (outside quotes) is another separator."""
    outside = b"".join(line.split(_QUOTE)[0::2])
    if separator.encode() in outside:
        return
    for other in _SNIFFED:
        if other != separator and other.encode() in outside:
            named = "tabs" if other == "\t" else f'"{other}"'
            header = _quoted(line.rstrip(b"\r").decode("utf-8", "replace"))
            alone = (
                " (or --separator ',' if it is one column whose name holds it)" if separator == "," else ""
            )
            raise UsageError(
                f"input {path} looks separated by {named} (its header is {header}): "
                f"pass --separator '{_shown_separator(other)}'{alone}"
            )


def _too_many_cells(path: Path, start: int, end: int, cells: int, header: int, sep: str) -> UsageError:
    where, that = (f"line {start}", "line") if start == end else (f"the row on lines {start}-{end}", "row")
    names = {",": "commas", ";": "semicolons", "\t": "tabs"}
    example = f' ("a{sep} b")' if sep in ",;|" else ""
    return UsageError(
        f"input {path}: {where} has {cells} fields but the header has {header}: "
        f"quote cells that contain {names.get(sep, repr(sep))}{example}, or fix that {that}"
    )


def _text_after_quote(
    path: Path, line: bytes, opened: tuple[int, int], number: int, q: int, sep: bytes
) -> UsageError:
    """A quoted cell closes and text follows: a quote inside it was not doubled, or one is missing."""
    if opened[0] != number:
        after = _text(line[q + 1 :].rstrip(b"\r"))
        return UsageError(
            f"input {path}: the quoted cell opened on line {opened[0]} closes on line {number} "
            f"with text after it ({after}): is its closing quote "
            'missing? a quote inside a cell is written as two ("")'
        )
    line = line.rstrip(b"\r")
    begin = opened[1]  # the cell's opening quote
    end = line.find(sep, q)
    raw = line[begin : end if end >= 0 else len(line)]
    inner = raw[1:-1] if len(raw) > 1 and raw.endswith(_QUOTE) else raw[1:]
    fixed = _text(b'"' + inner.replace(_QUOTE, b'""') + b'"', 60) if len(inner) < 50 else '"a ""b"" c"'
    shown = _text(line[begin : q + 3]) + ("..." if q + 3 < len(line) else "")
    return UsageError(
        f"input {path}: line {number} has text after a closing quote ({shown}): "
        f"a quote inside a quoted cell is written as two ({fixed})"
    )


def _stray_quote(path: Path, line: bytes, number: int, q: int, sep: bytes) -> UsageError:
    begin = line.rfind(sep, 0, q) + 1
    end = line.find(sep, q)
    cell = line[begin : end if end >= 0 else len(line)].rstrip(b"\r")
    fixed = _text(b'"' + cell.replace(_QUOTE, b'""') + b'"', 60) if len(cell) < 50 else '"a ""b"" c"'
    return UsageError(
        f'input {path}: line {number} has a quote (") inside a cell that does not start with one '
        f"({_text(cell)}): quote the whole cell and write each quote in it as two ({fixed}), "
        "or remove it"
    )
