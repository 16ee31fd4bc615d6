"""The Batch API's files, a line at a time: what batchgen uploads and what it reads back.

A request line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``
with the body the real-time compatible route takes, never streamed. A result line comes in
one of three shapes (``../shared/dashscope-protocol.md``, "Batch API"):

- answered: ``"response": {"status_code": 200, "request_id", "body": <chat.completion>}``;
- refused: ``"response": {"status_code": 400, ..., "body": {"error": {...}}}``, classified as
  the online call's error would be (a permanent one is kept, a transient one sent again);
- never run: ``"response": null, "error": {"code": "batch_expired" | "batch_cancelled", ...}``,
  free, and sent again.

Pure functions, tested on the recorded shapes in ``tests/test_batch_lines.py``, and the
:class:`ChunkFile` an input file is written to, line by line, within the file limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.api.openai import interpret, parse_reply
from batchgen.api.types import APIError, Disposition, as_dict
from batchgen.errors import RowProblem
from batchgen.results import ERROR, RowResult, answered, utc_now

if TYPE_CHECKING:
    from batchgen.batch.remote import RemoteBatch
    from batchgen.batch.store import ChunkRow

ENDPOINT = "/v1/chat/completions"  # the url of every request line, and the batch's endpoint
MAX_LINES = 50_000  # requests in one file
MAX_FILE_BYTES = 480_000_000  # the limit is "500 MB": decimal, with room for the multipart framing
MAX_LINE_BYTES = 6_000_000  # "6 MB", read as decimal (the smaller)
TOO_LARGE = "batchgen.TooLarge"
NOT_RUN = "not run"  # the error message prefix of a line the batch ended before running
BATCH = "batch"  # the billing_mode of a row answered in a batch
MISSING = "batchgen.BatchLineMissing"  # a row in neither file of an ended batch
UNREADABLE = "batchgen.BatchLineUnreadable"  # ... when some line of those files could not be read


def request_line(custom_id: str, body: Mapping[str, Any]) -> bytes:
    """One line of an input file, newline included (the body as sent online, unstreamed)."""
    line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def line_problem(line: bytes) -> RowProblem | None:
    """A line the service would refuse for its size: that row's error, not the file's."""
    if len(line) <= MAX_LINE_BYTES:
        return None
    return RowProblem(
        TOO_LARGE,
        f"the batch line is {len(line) / 1e6:.1f} MB, over the Batch API's 6 MB a line: "
        "send fewer or smaller images (or image URLs), or a shorter prompt",
    )


@dataclass(frozen=True, slots=True)
class LineResult:
    """One result line read: the row it answers, its output columns, and whether it is final
    (an answer, or an error sending again would repeat) or the row must be sent again."""

    custom_id: str
    result: RowResult
    final: bool


def _error_row(
    error: APIError, model: str, batch_id: str, attempts: int, message: str | None = None
) -> RowResult:
    return RowResult(
        status=ERROR,
        model=model,
        request_id=error.request_id,
        error_code=error.code,
        error_message=message or error.message,
        http_status=error.http_status,
        attempts=attempts,
        billing_mode=BATCH,
        batch_id=batch_id,
        finished_at=utc_now(),
    )


def read_result_line(
    raw: str | bytes,
    model: str,
    batch_id: str,
    check_json: Callable[[str | None], bool] | None = None,
) -> LineResult | None:
    """A line of an output or error file as a row's result; None for a line that is not one
    (blank, not JSON, no ``custom_id``): the caller counts it, the rows stay accounted for."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    custom_id = line["custom_id"]
    response = line.get("response")
    if isinstance(response, dict):
        status = response.get("status_code")
        status = status if isinstance(status, int) and not isinstance(status, bool) else 0
        request_id = response.get("request_id") or line.get("id")
        request_id = request_id if isinstance(request_id, str) else None
        body = as_dict(response.get("body"))
        choices = body.get("choices")
        if status == 200 and isinstance(choices, list) and choices and not body.get("error"):
            return LineResult(
                custom_id,
                answered(
                    parse_reply(body, request_id),
                    model,
                    check_json,
                    http_status=200,
                    attempts=1,
                    billing_mode=BATCH,
                    batch_id=batch_id,
                ),
                True,
            )
        headers = {"x-request-id": request_id} if request_id else {}
        outcome = interpret(status or 500, headers, json.dumps(body).encode())
        assert isinstance(outcome, APIError)  # a 200 without choices is an error too
        final = outcome.disposition is Disposition.ROW_ERROR
        return LineResult(custom_id, _error_row(outcome, model, batch_id, 1), final)
    error = as_dict(line.get("error"))
    code = str(error.get("code") or "batch_line_failed")
    message = f"{NOT_RUN}: {error.get('message') or code}"
    not_run = APIError(None, code, message, None, Disposition.RETRY)
    return LineResult(custom_id, _error_row(not_run, model, batch_id, 0), False)


_NOT_RUN = {"cancelled": "batch_cancelled", "expired": "batch_expired", "failed": "batch_failed"}
_THEN = {"batch": "it goes in a new batch on the next run", "online": "it is sent online",
         "none": "it is not sent again (--batch-fallback none)"}  # fmt: skip


def unanswered(
    row: ChunkRow,
    remote: RemoteBatch,
    bad_lines: dict[int, Any],
    model: str,
    fallback: str,
    unreadable: int = 0,
) -> LineResult:
    """A row of an ended batch with no result line: refused by validation, not run, or missing.
    With ``unreadable`` lines in its files, a missing row may have been answered (and billed)
    in one of them: it is kept as an error, not sent again unasked."""
    error = bad_lines.get(row.line)
    if error is not None:  # the service named this line: the same line would fail again
        code, message, final = str(error.get("code") or "invalid_line"), str(error.get("message")), True
    elif unreadable and remote.status != "failed":
        code, final = UNREADABLE, True
        message = (
            f"batch {remote.id}'s result files had {unreadable:,} unreadable line(s), which may hold "
            "this row's answer (billed): not sent again; --retry-errors sends it"
        )
    else:
        code, final = _NOT_RUN.get(remote.status, MISSING), False
        if remote.status == "failed":
            first = remote.errors[0] if remote.errors else {}
            why = f"failed validation ({first.get('message') or 'no detail'})"
        else:
            why = f"ended ({remote.status}) with no result line for this row"
        message = f"batch {remote.id} {why}; {_THEN[fallback]}"
    result = RowResult(
        status=ERROR, model=model, error_code=code, error_message=message, attempts=0,
        billing_mode=BATCH, batch_id=remote.id, finished_at=utc_now(),
    )  # fmt: skip
    return LineResult(row.key, result, final)


class ChunkFile:
    """The chunk being built: its lines in a temporary file beside the output, its rows."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(f".{output.name}.batch.tmp")
        self.rows: list[ChunkRow] = []
        self.reset()

    def reset(self) -> None:
        self.rows = []
        self.size = 0
        self.worst = Decimal(0)  # --max-cost: the most its lines can cost
        self.digest = hashlib.sha256()
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed by close/discard)

    def fits(self, size: int) -> bool:
        return len(self.rows) < MAX_LINES and self.size + size <= MAX_FILE_BYTES

    def append(self, line: bytes, row: ChunkRow, worst: Decimal) -> None:
        self.worst += worst
        self.file.write(line)
        self.digest.update(line)
        self.size += len(line)
        self.rows.append(row)

    def close(self) -> Path:
        self.file.close()
        return self.path

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
