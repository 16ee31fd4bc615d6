"""DashScope's native chat API as pure functions: routes, request bodies, replies, errors.

Nothing here does I/O, so every rule can be tested against recorded bodies
(``tests/test_protocol.py``). Facts come from the official SDK and captured traffic; see
``shared/dashscope-protocol.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from batchgen.api.faults import classify, load_body
from batchgen.api.stream import StreamAssembler, stream_error
from batchgen.api.types import APIError, Disposition, Reply, Route, as_dict, int_or_none, retry_after, text_of

ROUTE_PATHS: dict[str, str] = {
    "text": "/services/aigc/text-generation/generation",
    "multimodal": "/services/aigc/multimodal-generation/generation",
}

# DashScope's gateway refuses bodies over 16 MiB, or 64 MiB when they carry base64 images.
MAX_BODY = 16 * 1024 * 1024
MAX_BODY_BASE64 = 64 * 1024 * 1024
TOO_LARGE = "batchgen.TooLarge"


def too_large(content: bytes) -> APIError | None:
    """A body the gateway would refuse with 413: a row error before sending, not after."""
    limit, what = (
        (MAX_BODY_BASE64, "with base64 images")
        if b";base64," in content
        else (MAX_BODY, "without base64 data")
    )
    if len(content) <= limit:
        return None
    return APIError(
        None,
        TOO_LARGE,
        f"the request is {len(content) / 2**20:.1f} MiB, over DashScope's "
        f"{limit // 2**20} MiB limit for a body {what}: send fewer or smaller images "
        "(or image URLs), or a shorter prompt",
        None,
        Disposition.ROW_ERROR,
    )


def native_part(part: Any) -> Any:
    """A content part as the native multimodal route takes it; OpenAI-style parts are converted."""
    if not isinstance(part, dict) or "type" not in part:
        return part
    kind = part["type"]
    if kind == "text":
        return {"text": part.get("text", "")}
    if kind == "image_url":
        image = part.get("image_url")
        return {"image": image.get("url") if isinstance(image, dict) else image}
    return {k: v for k, v in part.items() if k != "type"}


def build_body(
    model: str, messages: list[dict[str, Any]], parameters: Mapping[str, Any], route: Route
) -> dict[str, Any]:
    """The request body: exactly ``model``, ``input`` and ``parameters``.

    On the multimodal route every message's content must be a list of parts, the system
    message's too, so plain strings are wrapped as ``[{"text": ...}]`` (and OpenAI-style
    parts from a messages column become native ones).
    """
    if route == "multimodal":
        messages = [
            {**m, "content": [{"text": m["content"]}]}
            if isinstance(m.get("content"), str)
            else {**m, "content": [native_part(p) for p in m["content"]]}
            if isinstance(m.get("content"), list)
            else m
            for m in messages
        ]
    return {
        "model": model,
        "input": {"messages": messages},
        "parameters": {"result_format": "message", **parameters},
    }


def streamed_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body of the same request sent streamed: deltas, which thinking requires."""
    return {**body, "parameters": {**body["parameters"], "incremental_output": True}}


def parse_reply(body: Mapping[str, Any], request_id: str | None = None) -> Reply:
    """Flatten a 200 body. Every usage sub-object may be missing, so each is read defensively."""
    output = as_dict(body.get("output"))
    choices = output.get("choices")
    choice = as_dict(choices[0]) if isinstance(choices, list) and choices else {}
    message = as_dict(choice.get("message"))
    content = text_of(message.get("content"))
    if content is None and isinstance(output.get("text"), str):  # result_format "text" replies
        content = output["text"]
    finish = choice.get("finish_reason", output.get("finish_reason"))
    if finish == "null":  # streamed chunks carry the string "null" until the last one
        finish = None
    usage = as_dict(body.get("usage"))
    prompt_details = as_dict(usage.get("prompt_tokens_details"))
    output_details = as_dict(usage.get("output_tokens_details"))
    input_tokens = int_or_none(usage.get("input_tokens"))
    output_tokens = int_or_none(usage.get("output_tokens"))
    total = int_or_none(usage.get("total_tokens"))
    if total is None and input_tokens is not None and output_tokens is not None:
        total = input_tokens + output_tokens
    request = body.get("request_id")
    return Reply(
        content=content,
        reasoning=text_of(message.get("reasoning_content")),
        finish_reason=finish if isinstance(finish, str) else None,
        request_id=request if isinstance(request, str) and request else request_id,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=total,
        cached_tokens=int_or_none(prompt_details.get("cached_tokens")),
        reasoning_tokens=int_or_none(output_details.get("reasoning_tokens")),
    )


def _has_answer(body: Mapping[str, Any]) -> bool:
    """A reply body has ``output.choices`` (a list) or ``output.text``; anything else is garbage."""
    output = body.get("output")
    return isinstance(output, dict) and (
        isinstance(output.get("choices"), list) or isinstance(output.get("text"), str)
    )


def interpret(http_status: int, headers: Mapping[str, str], raw: bytes) -> Reply | APIError:
    """Turn one HTTP response into a reply or a classified error.

    A 200 with a non-empty ``code`` is an error (the gateway does that), and a body that is
    not JSON is a transient fault (a truncated or proxied answer), retried like a 5xx.
    """
    header_id = headers.get("x-request-id")
    body = load_body(http_status, headers, raw)
    if isinstance(body, APIError):
        return body
    request_id = body.get("request_id") or header_id
    code = body.get("code")
    if http_status == 200 and not code:
        if _has_answer(body):
            return parse_reply(body, header_id)
        return APIError(
            http_status,
            "batchgen.BadResponse",
            f"HTTP 200 without output.choices: {raw[:120].decode('utf-8', 'replace')}",
            request_id if isinstance(request_id, str) else header_id,
            Disposition.RETRY,
            retry_after(headers),
        )
    code = str(code) if code else f"HTTP{http_status}"
    message = str(body.get("message") or "")
    return APIError(
        http_status, code, message, request_id, classify(http_status, code, message), retry_after(headers)
    )


class NativeStream(StreamAssembler):
    """DashScope's native stream: ``event:result`` chunks, the last with a real finish reason.

    Errors come as ``event:error`` under HTTP 200 with the real status in ``:HTTP_STATUS/``;
    they are classified like the same error unstreamed, so a streamed 429 is retried.
    """

    def add(self, event: Any) -> APIError | None:
        """Take one SSE event; an error event (or a chunk with a ``code``) ends the call."""
        status = event.status or 200
        try:
            body = json.loads(event.data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return stream_error(status, event.data, self.request_id)
        code = body.get("code")
        if event.event == "error" or code or status != 200:
            request_id = body.get("request_id") or self.request_id
            code = str(code) if code else f"HTTP{status}"
            message = str(body.get("message") or "")
            return APIError(status, code, message, request_id, classify(status, code, message))
        chunk = parse_reply(body, self.request_id)
        self.merge(chunk)
        if chunk.finish_reason:
            self.finished = True
        return None
