"""Turning table rows into chat messages.

Problems with the spec itself (a missing column, two ways of saying the same thing) are
``UsageError`` before anything is sent. Problems with one row (an empty prompt, a malformed
messages cell) become that row's error and the row is never sent.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from batchgen.errors import RowProblem, UsageError
from batchgen.images import attach, local_parts, row_images

ROLES = frozenset({"system", "user", "assistant", "tool"})
EMPTY_PROMPT = "batchgen.EmptyPrompt"
BAD_MESSAGES = "batchgen.InvalidMessages"


@dataclass(frozen=True, kw_only=True)
class PromptSpec:
    """Where each row's messages come from: one of a prompt column, a template or a messages column."""

    prompt_column: str | None = None  # None: "prompt" unless template/messages_column is given
    template: str | None = None
    system: str | None = None
    system_column: str | None = None
    messages_column: str | None = None
    image_columns: tuple[str, ...] = ()  # cells: URLs, local files or lists of them
    image_root: Path | None = None  # where relative image paths are found (the input's folder)

    def __post_init__(self) -> None:
        sources = [
            name
            for name, v in (
                ("--prompt-column", self.prompt_column),
                ("--template", self.template),
                ("--messages-column", self.messages_column),
            )
            if v
        ]
        if len(sources) > 1:
            raise UsageError(f"{' and '.join(sources)} both say where the prompt comes from: keep one")
        if self.system is not None and self.system_column:
            raise UsageError("--system and --system-column both set the system prompt: keep one")

    @property
    def may_have_images(self) -> bool:
        """Whether rows can carry local image files (what runs without images skip)."""
        return bool(self.image_columns or self.messages_column)

    def template_fields(self) -> list[str]:
        if self.template is None:
            return []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise UsageError(
                f"--template is malformed ({exc}); write fields as {{column}} and "
                "literal braces as {{ and }}"
            ) from None
        fields = []
        for _, name, _, _ in parsed:
            if name is None:
                continue
            if not name or name.isdigit() or any(c in name for c in ".[]"):
                raise UsageError(
                    f"--template field {{{name}}} must name a column, e.g. 'Summarize: {{text}}'"
                )
            fields.append(name)
        if not fields:
            raise UsageError("--template names no column: use fields like {text}")
        return fields

    def required_columns(self) -> list[str]:
        """Every input column the spec reads, in the order a user would list them."""
        if self.messages_column:
            columns = [self.messages_column]
        elif self.template is not None:
            columns = list(dict.fromkeys(self.template_fields()))
        else:
            columns = [self.prompt_column or "prompt"]
        if self.system_column:
            columns.append(self.system_column)
        columns.extend(c for c in self.image_columns if c not in columns)
        return columns


def check_columns(
    spec: PromptSpec, columns: Sequence[str], schema: Mapping[str, pl.DataType] | None = None
) -> None:
    """Fail early, listing what the table has, when the spec names a column it lacks.

    With ``schema``, also refuse text columns that hold lists or structs (a messages column
    may: Parquet stores conversations that way).
    """
    have = set(columns)
    for column in spec.required_columns():
        dtype = (schema or {}).get(column)
        if (
            dtype is not None
            and dtype.is_nested()
            and column != spec.messages_column
            and column not in spec.image_columns
        ):
            raise UsageError(
                f"column {column!r} holds {dtype}, not text: choose a text column "
                "or build the prompt with --template"
            )
    listing = ", ".join(columns)
    for column in spec.required_columns():
        if column in have:
            continue
        if spec.template is not None and column in spec.template_fields():
            what = f"--template field {{{column}}}"
        elif column == spec.system_column:
            what = f"--system-column {column!r}"
        elif column == spec.messages_column:
            what = f"--messages-column {column!r}"
        elif column in spec.image_columns:
            what = f"--image-column {column!r}"
        else:
            what = f"prompt column {column!r}"
            listing += " (choose one with --prompt-column or write a --template)"
        raise UsageError(f"{what} is not in the input; its columns are: {listing}")


def _parse_messages(cell: Any) -> list[dict[str, Any]] | RowProblem:
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return RowProblem(EMPTY_PROMPT, "the messages cell is empty")
    if isinstance(cell, str):
        try:
            value = json.loads(cell)
        except ValueError as exc:
            return RowProblem(BAD_MESSAGES, f"the messages cell is not valid JSON: {exc}")
    else:  # a Parquet list-of-struct column arrives as Python lists of dicts
        value = cell
    if not isinstance(value, list) or not value:
        return RowProblem(
            BAD_MESSAGES,
            'the messages cell must be a non-empty JSON array of {"role": ..., "content": ...} objects',
        )
    messages = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str | list)
        ):
            return RowProblem(
                BAD_MESSAGES, f"message {i} needs a role (system, user, assistant or tool) and a content"
            )
        # Typed storage (Parquet structs) gives every message every field, unset ones as null.
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message["content"], list):
            message["content"] = [
                {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
                for part in message["content"]
            ]
        messages.append(message)
    return messages


def build_messages(
    spec: PromptSpec,
    frame: pl.DataFrame,
    raw_messages: Sequence[Any] | None = None,
) -> list[list[dict[str, Any]] | RowProblem]:
    """One message list (or the reason it cannot be sent) per row, in row order.

    ``raw_messages`` are the messages cells exactly as the file held them, for formats where
    reading into a typed column would change them (JSONL: see ``tables.Source.batches``).
    """
    out = _build_messages(spec, frame, raw_messages)
    if not spec.may_have_images:
        return out
    root = spec.image_root or Path.cwd()
    if spec.messages_column:  # file: images written in the messages: checked like a column's
        out = [local_parts(m, root) if not isinstance(m, RowProblem) else m for m in out]
    if not spec.image_columns:
        return out
    cells = [frame.get_column(c).to_list() for c in spec.image_columns]
    for i, messages in enumerate(out):
        if isinstance(messages, RowProblem):
            continue
        images = row_images([column[i] for column in cells], root)
        if isinstance(images, RowProblem):
            out[i] = images
        elif images:
            out[i] = attach(messages, images)
    return out


def _build_messages(
    spec: PromptSpec, frame: pl.DataFrame, raw_messages: Sequence[Any] | None
) -> list[list[dict[str, Any]] | RowProblem]:
    check_columns(spec, frame.columns, frame.schema)
    n = frame.height
    if spec.system_column:
        systems: list[Any] = frame.get_column(spec.system_column).cast(pl.String).to_list()
    else:
        systems = [spec.system] * n

    out: list[list[dict[str, Any]] | RowProblem] = []
    if spec.messages_column:
        cells = raw_messages if raw_messages is not None else frame.get_column(spec.messages_column).to_list()
        for cell, system in zip(cells, systems, strict=True):
            messages = _parse_messages(cell)
            if isinstance(messages, list) and system and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": system}, *messages]
            out.append(messages)
        return out

    if spec.template is not None:
        fields = list(dict.fromkeys(spec.template_fields()))
        columns = {f: frame.get_column(f).cast(pl.String).to_list() for f in fields}
        prompts: list[str | RowProblem] = []
        for i in range(n):
            values = {f: columns[f][i] for f in fields}
            missing = [f for f, v in values.items() if v is None]
            if missing:
                prompts.append(
                    RowProblem(EMPTY_PROMPT, f"template field {{{missing[0]}}} is null in this row")
                )
            else:
                try:
                    prompts.append(spec.template.format_map(values))
                except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
                    raise UsageError(f"--template cannot be filled from row {i}: {exc}") from None
    else:
        column = spec.prompt_column or "prompt"
        prompts = frame.get_column(column).cast(pl.String).to_list()

    for prompt, system in zip(prompts, systems, strict=True):
        if isinstance(prompt, RowProblem):
            out.append(prompt)
        elif prompt is None or not prompt.strip():
            out.append(RowProblem(EMPTY_PROMPT, "the prompt is empty; the row was not sent"))
        else:
            messages = [{"role": "user", "content": prompt}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            out.append(messages)
    return out
