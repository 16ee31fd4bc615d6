"""The OpenAI-compatible chat API: DashScope's compatible mode, vLLM, Ollama, llama.cpp server.

``POST {base}/chat/completions`` with OpenAI's body (parameters at the top level, DashScope's
extras such as ``enable_thinking`` beside them), OpenAI's usage names and error envelope.
Replies flatten to the same ``Reply`` as the native protocol, so output tables do not depend
on the API used. Pure functions, tested on recorded shapes in ``tests/test_protocol.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from batchgen.api.faults import classify, load_body
from batchgen.api.stream import StreamAssembler, stream_error
from batchgen.api.types import APIError, Disposition, Reply, as_dict, int_or_none, retry_after, text_of

CHAT_PATH = "/chat/completions"  # under an OpenAI-compatible base URL

# Native-only parameters that have no meaning here.
_NATIVE_ONLY = frozenset({"result_format", "incremental_output"})


def openai_part(part: Any) -> Any:
    """A content part in OpenAI's typed form; native ``{"text"}`` / ``{"image"}`` are converted."""
    if not isinstance(part, dict) or "type" in part:
        return part
    if "text" in part:
        return {"type": "text", "text": part["text"]}
    if "image" in part:
        return {"type": "image_url", "image_url": {"url": part["image"]}}
    if "video" in part:
        return {"type": "video_url", "video_url": {"url": part["video"]}}
    return part


def build_body(model: str, messages: list[dict[str, Any]], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's body: ``model``, ``messages`` and the parameters that were set, at the top."""
    converted = [
        {**m, "content": [openai_part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
        for m in messages
    ]
    return {
        "model": model,
        "messages": converted,
        **{k: v for k, v in parameters.items() if k not in _NATIVE_ONLY},
    }


def streamed_body(body: dict[str, Any]) -> dict[str, Any]:
    """The same request streamed, with the usage chunk at the end (the bill needs it)."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


def _reasoning(message: Mapping[str, Any]) -> str | None:
    # DashScope and older vLLM say reasoning_content; newer vLLM and Ollama say reasoning.
    value = message.get("reasoning_content")
    if value is None:
        value = message.get("reasoning")
    return text_of(value)


def _usage(usage: Mapping[str, Any]) -> dict[str, int | None]:
    prompt = int_or_none(usage.get("prompt_tokens"))
    completion = int_or_none(usage.get("completion_tokens"))
    total = int_or_none(usage.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": total,
        "cached_tokens": int_or_none(as_dict(usage.get("prompt_tokens_details")).get("cached_tokens")),
        "reasoning_tokens": int_or_none(
            as_dict(usage.get("completion_tokens_details")).get("reasoning_tokens")
        ),
    }


def _request_id(body: Mapping[str, Any], header_id: str | None) -> str | None:
    """The ``x-request-id`` header, else the body's ``id`` (DashScope's is ``chatcmpl-<id>``)."""
    if header_id:
        return header_id
    value = body.get("request_id") or body.get("id")
    return value if isinstance(value, str) and value else None


def parse_reply(body: Mapping[str, Any], request_id: str | None = None) -> Reply:
    """Flatten a ``chat.completion`` body; every part of it may be missing."""
    choices = body.get("choices")
    choice = as_dict(choices[0]) if isinstance(choices, list) and choices else {}
    message = as_dict(choice.get("message"))
    finish = choice.get("finish_reason")
    return Reply(
        content=text_of(message.get("content")),
        reasoning=_reasoning(message),
        finish_reason=finish if isinstance(finish, str) else None,
        request_id=_request_id(body, request_id),
        **_usage(as_dict(body.get("usage"))),
    )


def _error_of(
    status: int, body: Mapping[str, Any], header_id: str | None, headers: Mapping[str, str]
) -> APIError:
    """OpenAI's envelope ``{"error": {"message", "type", "code"}}``; Ollama's ``{"error": "..."}``."""
    error = body.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        message = error.get("message")
        if isinstance(code, int) and not isinstance(code, bool):  # vLLM: "code": 500
            if status == 200 and 100 <= code <= 599:
                status = code  # an error inside a stream: its code is the real status
            code = error.get("type") or f"HTTP{code}"
    elif isinstance(error, str):
        code, message = None, error
    else:  # a native-style body from a DashScope gateway
        code, message = body.get("code"), body.get("message")
    code = str(code) if code else f"HTTP{status}"
    message = str(message or "")
    request_id = body.get("request_id") or header_id
    return APIError(
        status,
        code,
        message,
        request_id if isinstance(request_id, str) else None,
        classify(status, code, message),
        retry_after(headers),
    )


def interpret(http_status: int, headers: Mapping[str, str], raw: bytes) -> Reply | APIError:
    """One HTTP response of the compatible API as a reply or a classified error."""
    header_id = headers.get("x-request-id")
    body = load_body(http_status, headers, raw)
    if isinstance(body, APIError):
        return body
    if http_status == 200 and not body.get("error") and not body.get("code"):
        if isinstance(body.get("choices"), list) and body["choices"]:
            return parse_reply(body, header_id)
        return APIError(
            http_status,
            "batchgen.BadResponse",
            f"HTTP 200 without choices: {raw[:120].decode('utf-8', 'replace')}",
            _request_id(body, header_id),
            Disposition.RETRY,
            retry_after(headers),
        )
    return _error_of(http_status, body, header_id, headers)


class OpenAIStream(StreamAssembler):
    """An OpenAI stream: ``data:`` chunks of deltas, a usage chunk, then ``data: [DONE]``.

    Complete once a finish reason has come (the usage chunk and ``[DONE]`` follow it, but some
    servers send neither: the answer is whole, and sending it again would pay twice);
    anything shorter is a cut stream and is sent again.
    """

    def add(self, event: Any) -> APIError | None:
        if event.data.strip() == "[DONE]":
            self.finished = True
            return None
        try:
            body = json.loads(event.data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return stream_error(event.status or 200, event.data, self.request_id)
        if body.get("error") or event.event == "error" or (body.get("code") and "choices" not in body):
            # OpenAI's envelope, or a DashScope gateway's native error frame (event:error with
            # the real status in :HTTP_STATUS/, seen on compatible-mode streams too).
            return _error_of(event.status or 200, body, self.request_id, {})
        choices = body.get("choices")
        choice = as_dict(choices[0]) if isinstance(choices, list) and choices else {}
        delta = as_dict(choice.get("delta"))
        finish = choice.get("finish_reason")
        usage = body.get("usage")
        self.merge(
            Reply(
                content=text_of(delta.get("content")),
                reasoning=_reasoning(delta),
                finish_reason=finish if isinstance(finish, str) else None,
                request_id=_request_id(body, None),
                **_usage(as_dict(usage)),
            )
        )
        return None

    def result(self) -> Reply | APIError:
        if self.finished and not self.has_finish:
            return self.cut("the stream ended without a finish reason")
        self.finished = self.has_finish
        return super().result()
