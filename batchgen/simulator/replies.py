"""The reply to a request (:func:`simulated_reply`): a pure function of the request."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from batchgen.simulator.images import IMAGE_TOKENS, _image_values, image_id
from batchgen.simulator.jsonreplies import _break_json, _compact_json, _schema_instance
from batchgen.simulator.models import _thinks
from batchgen.simulator.text import _cut_to_tokens, _message_text, _prose, _snippet, count_tokens


@dataclass(frozen=True)
class SimReply:
    """A simulated model answer with the usage the service would bill for it."""

    content: str
    reasoning: str | None
    finish_reason: Literal["stop", "length"]
    input_tokens: int  # includes image_tokens
    output_tokens: int  # includes reasoning_tokens, as DashScope bills them
    reasoning_tokens: int
    image_tokens: int = 0
    image_ids: tuple[str, ...] = ()  # image_id() of each image, in request order

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


# The test marker that makes a JSON-mode reply invalid JSON (the other markers: errors.py).
_BAD_JSON_MARKER = "[sim:BadJson]"


def _plain(message: Any) -> Any:
    """A message whose parts are all text, with its content as one string.

    The multimodal route wraps text in ``[{"text": ...}]`` and the text route and OpenAI route
    need not, so the reply's seed must not see the difference.
    """
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if (
        isinstance(content, list)
        and content
        and all(isinstance(p, dict) and set(p) == {"text"} and isinstance(p["text"], str) for p in content)
    ):
        return {**message, "content": "".join(p["text"] for p in content)}
    return message


def simulated_reply(
    model: str,
    messages: list[dict],
    *,
    max_tokens: int | None = None,
    enable_thinking: bool | None = None,
    thinking_budget: int | None = None,
    response_format: dict | None = None,
) -> SimReply:
    """The answer the simulator gives to a request: a pure function of its arguments.

    Tests compute the expected answer with this very function, and a rerun must reproduce
    identical output, so everything derives from a SHA-256 of the model and the messages
    (never ``hash()``, which changes per process). The reply quotes the last user message, and
    names the images of the request by :func:`image_id`, so a reader of a result file can see
    what it answers. ``max_tokens`` cuts the answer (finish_reason "length"), like the real
    service, even a JSON one, which is then invalid.

    Thinking follows the real defaults (``enable_thinking=None``): qwq-/qvq- models always
    think, open-source hybrid Qwen3 models (qwen3-8b, ...) unless ``enable_thinking`` is False,
    other models only if it is True. Reasoning tokens are capped by ``thinking_budget`` and
    billed within ``output_tokens``.

    ``response_format`` is the request's: ``{"type": "json_object"}`` answers the compact
    object ``{"prompt": <snippet>, "images": [<ids>] (only if any), "answer": <prose>}``;
    ``{"type": "json_schema", "json_schema": {"schema": ...}}`` a deterministic instance of the
    schema. In JSON mode a message containing ``[sim:BadJson]`` gets invalid JSON instead.
    The OpenAI route converts its messages to native ones first (``{"text": ...}`` and
    ``{"image": url}`` parts), so one conversation gets one reply on every route.
    """
    digest = _digest(model, messages)
    snippet = _snippet(_prompt(messages))
    image_ids = tuple(image_id(value) for value in _image_values(messages) if isinstance(value, str))
    content = _content(response_format, digest, snippet, image_ids, messages)

    finish_reason: Literal["stop", "length"] = "stop"
    if max_tokens is not None and count_tokens(content) > max_tokens:
        content = _cut_to_tokens(content, max_tokens)
        finish_reason = "length"

    reasoning = _reasoning(model, enable_thinking, thinking_budget, digest, snippet)
    reasoning_tokens = 0 if reasoning is None else count_tokens(reasoning)
    image_tokens = IMAGE_TOKENS * len(image_ids)
    input_tokens = sum(count_tokens(_message_text(m)) + 4 for m in messages) + 3 + image_tokens
    return SimReply(
        content=content,
        reasoning=reasoning,
        finish_reason=finish_reason,
        input_tokens=max(1, input_tokens),
        output_tokens=count_tokens(content) + reasoning_tokens,
        reasoning_tokens=reasoning_tokens,
        image_tokens=image_tokens,
        image_ids=image_ids,
    )


def _digest(model: str, messages: list[dict]) -> bytes:
    """SHA-256 of the model and the messages, the same whichever route wrapped their text."""
    canonical = json.dumps(
        [model, [_plain(m) for m in messages]],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def _prompt(messages: list[dict]) -> str:
    """The text the reply quotes: the last user message's, else the last message's."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _message_text(message)
    return _message_text(messages[-1]) if messages else ""


def _content(
    response_format: dict | None,
    digest: bytes,
    snippet: str,
    image_ids: tuple[str, ...],
    messages: list[dict],
) -> str:
    """The whole answer, before max_tokens cuts it: prose, or JSON in the format asked for."""
    prose = _prose(digest + b"answer", 8, 60)
    format_type = response_format.get("type") if isinstance(response_format, dict) else None
    if format_type == "json_object":
        document: dict[str, Any] = {"prompt": snippet}
        if image_ids:
            document["images"] = list(image_ids)
        document["answer"] = prose
        content = _compact_json(document)
    elif format_type == "json_schema":
        spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        content = _compact_json(_schema_instance(schema, digest, "$"))
    else:
        shown = ""
        if image_ids:
            noun = "image" if len(image_ids) == 1 else "images"
            shown = f" [{len(image_ids)} {noun}: {', '.join(image_ids)}]"
        content = f'Qwen (simulated) on "{snippet}"{shown}: ' + prose
    if format_type in ("json_object", "json_schema") and any(
        _BAD_JSON_MARKER in _message_text(message) for message in messages
    ):
        content = _break_json(content)
    return content


def _reasoning(
    model: str, enable_thinking: bool | None, thinking_budget: int | None, digest: bytes, snippet: str
) -> str | None:
    """The reasoning of a model that thinks (cut at ``thinking_budget``), or None."""
    if not _thinks(model, enable_thinking):
        return None
    reasoning = f'Let me think about "{snippet}". ' + _prose(digest + b"reasoning", 20, 80)
    if thinking_budget is not None and count_tokens(reasoning) > thinking_budget:
        reasoning = _cut_to_tokens(reasoning, thinking_budget)
    return reasoning
