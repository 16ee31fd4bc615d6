"""Log lines on stderr, for people (``batchgen: ...``) or for log collectors (one JSON object).

Library code logs through ``logging.getLogger("batchgen")`` and attaches machine-readable
fields with ``extra={"event": ..., "fields": {...}}``; the CLI chooses the format here.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LOGGER = "batchgen"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        label = {logging.ERROR: "error: ", logging.WARNING: "warning: "}.get(record.levelno, "")
        return f"batchgen: {label}{record.getMessage()}"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "event", "message", ...fields}``, one object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "message"),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(
    log_format: str = "text", *, quiet: bool = False, stream: TextIO | None = None
) -> logging.Logger:
    """Send batchgen's records to stderr in ``log_format``; ``quiet`` keeps warnings and errors."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    return logger


def event(name: str, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call: ``log.info("...", extra=event("summary", rows=3))``."""
    return {"event": name, "fields": fields}
