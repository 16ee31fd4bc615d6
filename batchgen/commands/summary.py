"""``--summary PATH``: the run as JSON, for cron wrappers and dashboards."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchgen.options import RunOptions
from batchgen.results import RunResult
from batchgen.tables import write_atomically

log = logging.getLogger("batchgen")


@dataclass
class RunSummary:
    """``--summary PATH``: the run as JSON, for cron wrappers and dashboards."""

    options: RunOptions
    started: datetime
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    result: RunResult | None = None
    output: Path | None = None

    def counts(self) -> dict[str, Any]:
        if self.result is None:
            return {}
        s = self.result.stats
        return {
            "rows": {
                "total": s.total,
                "ok": s.ok,
                "error": s.error,
                "skipped": s.skipped,
                "pending": s.pending,
                "resumed": s.resumed,
                "changed": s.changed,
            },
            "tokens": {
                "input": s.input_tokens,
                "output": s.output_tokens,
                "sent_input": s.sent_input_tokens,
                "sent_output": s.sent_output_tokens,
            },
            "cost": {"spent_usd": str(s.spent), "total_usd": str(s.cost), "unpriced_rows": s.unpriced_rows}
            if s.priced
            else None,
            "attempts": s.attempts,
            "error_codes": dict(s.error_codes.most_common()),
        }

    def write(self, *, exit_code: int, error: str | None = None) -> None:
        path = None if self.options.policy.dry_run else self.options.output.summary_path
        if path is None:  # none asked for, or a dry run, which writes nothing
            return
        ended = datetime.now(UTC)
        summary = {
            "run_id": self.run_id,
            "job": self.options.output.job,
            "started_at": self.started.isoformat(),
            "ended_at": ended.isoformat(),
            "duration_s": round((ended - self.started).total_seconds(), 3),
            "input": str(self.options.input.input_path),
            "output": str(self.output or self.options.output.output_path),
            "model": self.options.server.model,
            "exit_code": exit_code,
            "error": error,
            "stopped_by": self.result.stopped if self.result else None,
            **self.counts(),
        }
        text = json.dumps(summary, indent=2, ensure_ascii=False).encode() + b"\n"
        try:  # atomic, and readable like the outputs (0666 less the umask), not mkstemp's 0600
            write_atomically(Path(path), lambda f: f.write(text))
        except OSError as exc:
            log.warning("could not write the summary %s: %s", path, exc.strerror or exc)
