"""A batch's life on the simulated clock (:class:`_Runner`), computed lazily and deterministically.

Nothing runs in the background: every call to the Files or Batch API first brings each batch up
to the simulated time of the call, so a batch's state depends only on the times it was created
(and cancelled), never on when or how often it is polled. In simulated seconds from
``created_at``::

    validating   for batch_validation_seconds           -> failed (bad file: errors, no files)
    in_progress  counts at total, still for batch_queue_seconds, then one line per
                 1/batch_lines_per_second                 -> expired at created_at + window
    finalizing   for batch_finalizing_seconds            -> completed
    cancelling   for batch_finalizing_seconds after the cancel call -> cancelled

Lines run in an order drawn from a hash of the batch id and their custom_id (never the input
order: clients must match results by custom_id), and the result files list them in that order.
A line that runs is answered by :func:`answer_line` and recorded in ``BatchStats.executed``;
expiry and cancellation stop the lines not yet run, which are listed in the error file as
``batch_expired`` / ``batch_cancelled`` and counted failed. As in the real captures,
``expires_at`` is always null and ``cancelling_at`` stays null until the batch is cancelled.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from batchgen.simulator.batchlines import _Line, answer_line, not_run_line, validate_file
from batchgen.simulator.config import BatchLimits, BatchStats, SimulatorConfig
from batchgen.simulator.files import OUTPUT_PREFIX, FileStore

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
CANCELLABLE = frozenset({"validating", "in_progress"})
_STAMPS = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


@dataclass
class _Batch:
    """A batch and how far it got. Times are simulated unix seconds (floats)."""

    id: str
    seq: int  # creation order, for listing newest first
    input_file_id: str
    endpoint: str
    completion_window: str
    window: float  # the completion window, in seconds
    metadata: dict[str, str]
    content: bytes  # the input file as it was at create time (dropped once validated)
    created: float
    status: str = "validating"
    lines: list[_Line] | None = None  # once validated: the lines in the order they run
    errors: dict[str, Any] | None = None
    done: int = 0  # lines run so far
    results: list[dict[str, Any]] = field(default_factory=list)  # their output lines
    completed: int = 0
    failed: int = 0
    cancel_at: float | None = None
    stamps: dict[str, float] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def deadline(self) -> float:
        return self.created + self.window

    def describe(self) -> dict[str, Any]:
        """The batch object, as ``GET /batches/{id}`` answers it."""
        stamps = {name: _unix(self.stamps.get(name)) for name in _STAMPS}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": _unix(self.created),
            **stamps,
            "request_counts": {
                "total": 0 if self.lines is None else len(self.lines),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


def _unix(at: float | None) -> int | None:
    return None if at is None else math.floor(at)


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\0".join(str(part) for part in parts).encode("utf-8")).digest()


@dataclass(frozen=True)
class _Timing:
    validation: float
    queue: float
    rate: float  # lines per second
    finalizing: float


class _Runner:
    """Brings batches up to a simulated time: validates, runs lines, writes the result files."""

    def __init__(self, config: SimulatorConfig, files: FileStore, stats: BatchStats) -> None:
        self._timing = _Timing(
            config.batch_validation_seconds,
            config.batch_queue_seconds,
            config.batch_lines_per_second,
            config.batch_finalizing_seconds,
        )
        self._limits: BatchLimits = config.batch_limits
        self._line_500 = config.batch_fault_line_500
        self._seed = config.seed
        self._files = files
        self._stats = stats

    def advance(self, batch: _Batch, now: float) -> None:
        """Move ``batch`` on to where it is at ``now``."""
        if batch.status in TERMINAL:
            return
        validated_at = batch.created + self._timing.validation
        if batch.cancel_at is not None and batch.cancel_at < validated_at:
            self._settle_cancel(batch, now)
            return
        if now < validated_at:
            return
        if batch.lines is None and not self._validate(batch, validated_at):
            return
        assert batch.lines is not None
        self._run(batch, batch.lines, now)
        if batch.done == len(batch.lines):
            self._finalize(batch, batch.lines, now)
        elif batch.cancel_at is not None:
            self._settle_cancel(batch, now)
        elif now >= batch.deadline:
            self._close(batch, "expired", batch.deadline, "batch_expired")

    def _validate(self, batch: _Batch, at: float) -> bool:
        lines, errors = validate_file(batch.content, batch.endpoint, self._limits)
        batch.content = b""
        if errors is not None:
            batch.errors = errors
            batch.status = "failed"
            batch.stamps["failed_at"] = at
            return False
        batch.lines = sorted(lines, key=lambda line: _digest(batch.id, line.custom_id))
        batch.status = "in_progress"
        batch.stamps["in_progress_at"] = at
        return True

    def _start(self, batch: _Batch) -> float:
        return batch.created + self._timing.validation + self._timing.queue

    def _run(self, batch: _Batch, lines: list[_Line], now: float) -> None:
        """Run the lines that finish by ``now``, the deadline and the cancel, whichever is first."""
        stop = min(now, batch.deadline, math.inf if batch.cancel_at is None else batch.cancel_at)
        start = self._start(batch)
        while batch.done < len(lines):
            finished = start + (batch.done + 1) / self._timing.rate
            if finished > stop:
                break
            line = lines[batch.done]
            share = int.from_bytes(_digest(self._seed, batch.id, line.custom_id, "500")[:8], "big") / 2**64
            output, ok = answer_line(
                line,
                batch.endpoint,
                str(uuid.uuid4()),
                math.floor(finished),
                internal_error=share < self._line_500,
            )
            batch.results.append(output)
            if ok:
                batch.completed += 1
            else:
                batch.failed += 1
            batch.done += 1
            self._stats.executed.append((batch.id, line.custom_id))

    def _finalize(self, batch: _Batch, lines: list[_Line], now: float) -> None:
        finalizing_at = self._start(batch) + len(lines) / self._timing.rate
        batch.status = "finalizing"
        batch.stamps["finalizing_at"] = finalizing_at
        if now >= finalizing_at + self._timing.finalizing:
            self._close(batch, "completed", finalizing_at + self._timing.finalizing, None)

    def _settle_cancel(self, batch: _Batch, now: float) -> None:
        assert batch.cancel_at is not None
        batch.status = "cancelling"
        cancelled_at = batch.cancel_at + self._timing.finalizing
        if now >= cancelled_at:
            batch.stamps["cancelling_at"] = cancelled_at  # as the real service reports it
            self._close(batch, "cancelled", cancelled_at, "batch_cancelled")

    def _close(self, batch: _Batch, status: str, at: float, not_run: str | None) -> None:
        """End ``batch`` at ``at``: lines not run become ``not_run`` errors; write the files."""
        lines = batch.lines or []
        skipped = [not_run_line(line, not_run) for line in lines[batch.done :]] if not_run else []
        batch.failed += len(skipped)
        successes = [r for r in batch.results if r["response"]["status_code"] == 200]
        failures = [r for r in batch.results if r["response"]["status_code"] != 200] + skipped
        if successes:
            batch.output_file_id = self._write(batch, "output", successes, at)
        if failures:
            batch.error_file_id = self._write(batch, "error", failures, at)
        batch.results = []
        batch.status = status
        batch.stamps[f"{status}_at"] = at

    def _write(self, batch: _Batch, kind: str, results: list[dict[str, Any]], at: float) -> str:
        content = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in results)
        filename = f"{batch.id}_{kind}.jsonl"
        return self._files.add(OUTPUT_PREFIX, filename, "batch_output", content.encode(), math.floor(at)).id
