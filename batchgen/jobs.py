"""Job files: a run described in TOML (``jobs/NAME.toml``), for cron and for reuse.

Keys are the long option names of ``batchgen run`` with ``_`` for ``-`` (``max_attempts``,
``prompt_column``), plus ``input``, ``output`` and a ``[parameters]`` table for anything
``--param`` would send. Values have the option's type, checked strictly: ``concurrency =
"16"`` is an error naming the key, not a silent conversion.

Paths may hold ``{date}`` (``2026-11-25``), ``{datetime}`` (``2026-11-25T013000Z``) and
``{job}`` (the job file's name without ``.toml``), filled in UTC when the run starts.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchgen.errors import UsageError

# Job-file key -> the run command's parameter name, where they differ.
RENAMED = {
    "input": "input_path",
    "output": "output_path",
    "system": "system_prompt",
    "parameters": "params",
    "summary": "summary_path",
    "prices": "prices_path",
    "image_column": "image_columns",
}
# One-off decisions, made on the command line only.
NOT_IN_JOBS = frozenset({"job", "job_path", "fresh", "dry_run"})
PATH_KEYS = ("input_path", "output_path", "summary_path")  # where placeholders are filled


def load_job(path: str | Path) -> dict[str, Any]:
    """The job file's table, or a one-line ``UsageError`` naming what is wrong with it."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"job file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read the job file {path}: {exc.strerror or exc}") from None


def _type_name(value: Any) -> str:
    return {
        bool: "true/false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def check_value(job: str, key: str, value: Any, expected: str) -> Any:
    """Check a job value against the option's kind: str, int, float, bool, strs or table."""
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "strs": isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "table": isinstance(value, dict),
    }[expected]
    if not ok:
        want = {
            "str": "a string",
            "int": "a whole number",
            "float": "a number",
            "bool": "true or false",
            "strs": "a string or a list of strings",
            "table": "a table ([parameters])",
        }[expected]
        raise UsageError(f"{job}: {key!r} must be {want}, got {_type_name(value)} {value!r}")
    if expected == "float":
        return float(value)
    if expected == "strs":
        return (value,) if isinstance(value, str) else tuple(value)
    return value


def job_options(job_path: str | Path, kinds: Mapping[str, str]) -> dict[str, Any]:
    """The job file as run-command parameters: ``kinds`` maps each parameter to its kind."""
    table = load_job(job_path)
    options: dict[str, Any] = {}
    known = sorted(k for k in {*kinds, *RENAMED} - set(RENAMED.values()) - NOT_IN_JOBS)
    for key, value in table.items():
        name = RENAMED.get(key, key)
        if name not in kinds or key in NOT_IN_JOBS or (key in RENAMED.values()):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"{job_path}: unknown key {key!r}; {hint}known keys: {', '.join(known)}")
        if name == "params":
            value = check_value(str(job_path), key, value, "table")
            options[name] = dict(value)
        else:
            options[name] = check_value(str(job_path), key, value, kinds[name])
    return options


PLACEHOLDERS = ("date", "datetime", "job")
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def fill_placeholders(path: str, *, job: str | None, now: datetime | None = None) -> str:
    """Fill ``{date}``, ``{datetime}`` and ``{job}``; ``{{`` and ``}}`` are literal braces.

    Any other ``{name}`` is an error naming it: a typo such as ``{dat}`` must not become a file
    literally called ``{dat}.csv`` that the next night's run overwrites.
    """
    now = now or datetime.now(UTC)
    values = {"date": now.strftime("%Y-%m-%d"), "datetime": now.strftime("%Y-%m-%dT%H%M%SZ"), "job": job}

    def fill(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name not in values:
            close = difflib.get_close_matches(name, PLACEHOLDERS, n=1)
            hint = f"did you mean {{{close[0]}}}? " if close else ""
            known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            raise UsageError(
                f"{path!r} has an unknown placeholder {token}: {hint}paths may use {known} "
                "(write a literal brace as {{ or }})"
            )
        value = values[name]
        if value is None:
            raise UsageError(f"{path!r} uses {{job}}, which only a --job file defines")
        return value

    return _FIELD.sub(fill, path)
