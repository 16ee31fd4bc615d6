"""What each row will ask, decided before anything is sent: one rule for the run, the resume
line before it and ``--dry-run``.

messages (``prompts``) -> the request body the run's API takes -> its journal hash -> the
journal's verdict (answered already, changed, an error to retry, never sent).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from batchgen.config import RunConfig
from batchgen.errors import RowProblem
from batchgen.images import portable
from batchgen.journal import CHANGED, RETRY, Answers, Entry, request_hash, reuse, row_keys
from batchgen.jsonmode import json_word_problem, mentions_json
from batchgen.prompts import PromptSpec, build_messages

Batch = tuple[pl.DataFrame, "list[Any] | None"]  # rows, and their messages cells as written


def row_digest(body: dict[str, Any], endpoint: str, spec: PromptSpec) -> str:
    """The journal's hash of a row's request (local images by their path under the table)."""
    if spec.may_have_images:
        body = portable(body, spec.image_root)
    return request_hash(body, endpoint)


def request_body(config: RunConfig, messages: list[dict[str, Any]]) -> dict[str, Any] | RowProblem:
    """One row's request as the run's API takes it, or why the row cannot be sent.

    Shared by runs and dry runs, so both agree on what a row asks (and on its journal hash).
    Streaming flags are added only when sending: a streamed and an unstreamed call for the
    same row are the same request.
    """
    fmt = config.parameters.get("response_format")
    if (
        config.dashscope
        and isinstance(fmt, dict)
        and fmt.get("type") == "json_object"
        and not mentions_json(messages)
    ):
        return json_word_problem()
    return config.dialect.body(config.model, messages, config.parameters, config.effective_route)


@dataclass(slots=True)
class PlannedRow:
    """One row's verdict before anything is sent: why it cannot go, its journalled answer, or
    the request to send and why (``journal.NEW`` / ``CHANGED`` / ``RETRY``)."""

    key: str
    problem: RowProblem | None = None
    body: dict[str, Any] | None = None
    digest: str = ""
    earlier: Entry | None = None
    why: str | None = None
    last: Entry | None = None  # the journal's entry for this very request, reusable or not


def plan_rows(
    frame: pl.DataFrame,
    raw: list[Any] | None,
    offset: int,
    config: RunConfig,
    spec: PromptSpec,
    *,
    id_column: str | None,
    endpoint: str,
    lookup: Callable[[list[str]], Mapping[str, Answers]] | None,
    retry_errors: bool,
) -> list[PlannedRow]:
    """messages → body → journal hash → journal verdict, for one batch: the one rule that a run,
    the resume line before it and ``--dry-run`` all follow."""
    keys = row_keys(frame, id_column, offset)
    previous = lookup(keys) if lookup is not None else {}
    planned = []
    for key, messages in zip(keys, build_messages(spec, frame, raw), strict=True):
        body = messages if isinstance(messages, RowProblem) else request_body(config, messages)
        if isinstance(body, RowProblem):
            planned.append(PlannedRow(key, problem=body))
            continue
        digest = row_digest(body, endpoint, spec)
        answers = previous.get(key)
        earlier, why = reuse(answers, digest, retry_errors=retry_errors)
        last = answers.get(digest) if answers else None
        planned.append(PlannedRow(key, body=body, digest=digest, earlier=earlier, why=why, last=last))
    return planned


@dataclass
class ResumePlan:
    """What a resumed run will do, counted before anything is paid."""

    done: int = 0  # answered in the journal for today's request: not sent
    new: int = 0
    changed: int = 0
    retry: int = 0
    unsendable: int = 0  # rows that are errors without being sent (empty prompt, ...)
    held: int = 0  # in batches not yet collected: pending, not sent

    @property
    def to_send(self) -> int:
        return self.new + self.changed + self.retry

    def line(self) -> str:
        parts = [
            f"{n:,} {what}"
            for n, what in (
                (self.changed, "changed since the last run"),
                (self.retry, "errors sent again"),
                (self.new, "never sent"),
            )
            if n
        ]
        detail = f" ({', '.join(parts)})" if parts and parts != [f"{self.new:,} never sent"] else ""
        unsendable = f"; {self.unsendable:,} not sendable" if self.unsendable else ""
        held = f"; {self.held:,} in batches not yet collected" if self.held else ""
        return f"resumed: {self.done:,} done, {self.to_send:,} to go{detail}{unsendable}{held}"


def plan_resume(
    batches: Iterable[Batch],
    config: RunConfig,
    spec: PromptSpec,
    *,
    id_column: str | None,
    endpoint: str,
    lookup: Callable[[list[str]], Mapping[str, Answers]],
    retry_errors: bool,
    held: Container[str] = frozenset(),
) -> ResumePlan:
    """Count every row's verdict against the journal, without sending: the resume line.
    ``held``: the keys of rows in batches not yet collected (they stay pending)."""
    plan = ResumePlan()
    offset = 0
    for frame, raw in batches:
        for row in plan_rows(
            frame, raw, offset, config, spec, id_column=id_column, endpoint=endpoint, lookup=lookup,
            retry_errors=retry_errors,
        ):  # fmt: skip
            if row.problem is not None:
                plan.unsendable += 1
            elif row.earlier is not None:
                plan.done += 1
            elif row.key in held:
                plan.held += 1
            elif row.why == CHANGED:
                plan.changed += 1
            elif row.why == RETRY:
                plan.retry += 1
            else:
                plan.new += 1
        offset += frame.height
    return plan
