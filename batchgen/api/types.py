"""What every answer of either API becomes: a ``Reply`` or an ``APIError`` with its ``Disposition``."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Route = Literal["text", "multimodal"]  # the native API's two chat routes
Api = Literal["dashscope", "openai"]  # the wire format: native, or OpenAI-compatible


@dataclass(frozen=True, slots=True)
class Reply:
    """What a successful call produced, already flattened to output columns."""

    content: str | None
    reasoning: str | None
    finish_reason: str | None
    request_id: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None


class Disposition(enum.Enum):
    RETRY = "retry"  # transient: back off and send again
    ROW_ERROR = "row_error"  # this row cannot succeed as sent; record it and go on
    FATAL = "fatal"  # no row can succeed: stop the whole run


@dataclass(frozen=True, slots=True)
class APIError:
    """A failed attempt as the server (or the wire) described it."""

    http_status: int | None
    code: str
    message: str
    request_id: str | None
    disposition: Disposition
    retry_after: float | None = None
    billed: tuple[int, int] | None = None  # (input, output) tokens a cut stream was billed


def text_of(content: Any) -> str | None:
    """Message content as a string: the text route gives a string, the multimodal a parts list.

    No text is None, never "": a tool call or a reply cut while thinking has ``"content": ""``.
    """
    if content is None or isinstance(content, str):
        return content or None
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) or None
    return str(content)


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date; DashScope sends none at all, so don't bother parsing it
        return None
