"""What goes on the wire: JSON bodies, stream events and their usage, for both protocols."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from batchgen.simulator.errors import _OUTPUT_INSPECTION, _ApiError, _error_payload, _openai_error
from batchgen.simulator.replies import SimReply
from batchgen.simulator.streaming import _Piece, _stream_pieces


def _dumps(payload: dict[str, Any]) -> bytes:
    # DashScope sends UTF-8 text unescaped; so do we.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json_response(status: int, payload: dict[str, Any], request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=_dumps(payload),
        content_type="application/json",
        headers={"x-request-id": request_id},
    )


# Exactly the real gateway's header value, without aiohttp's space after the semicolon.
_SSE_CONTENT_TYPE = "text/event-stream;charset=UTF-8"


def _native_event(event_id: int, kind: str, status: int, data: dict[str, Any]) -> bytes:
    return f"id:{event_id}\nevent:{kind}\n:HTTP_STATUS/{status}\ndata:".encode() + _dumps(data) + b"\n\n"


def _openai_event(data: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(data) + b"\n\n"


_OPENAI_DONE = b"data: [DONE]\n\n"


@dataclass
class _Call:
    """A validated request, with the reply it gets."""

    route: str
    model: str
    parameters: dict[str, Any]
    reply: SimReply
    stream: bool
    include_usage: bool  # OpenAI streams: end with a usage chunk
    output_inspection: bool  # "[sim:OutputInspection]": the output fails moderation


@dataclass
class _Answer:
    """What to send: a JSON body, or the events of a stream; and what to count."""

    status: int
    outcome: str
    payload: dict[str, Any] | None = None
    events: list[bytes] | None = None
    content: str | None = None  # the served reply, for a success
    total_tokens: int = 0


def _native_usage(reply: SimReply, piece: _Piece | None, multimodal: bool) -> dict[str, Any]:
    output_tokens = reply.output_tokens if piece is None else piece.output_tokens
    usage: dict[str, Any] = {
        "input_tokens": reply.input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": reply.input_tokens + output_tokens,
        # As in the recorded bodies: the implicit cache reports what it served (never, here).
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if reply.reasoning is not None:
        reasoning_tokens = reply.reasoning_tokens if piece is None else piece.reasoning_tokens
        usage["output_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    if multimodal:
        details = {"text_tokens": reply.input_tokens - reply.image_tokens}
        if reply.image_tokens:
            details["image_tokens"] = reply.image_tokens
            usage["image_tokens"] = reply.image_tokens
        usage["input_tokens_details"] = details
    return usage


def _openai_usage(reply: SimReply) -> dict[str, Any]:
    prompt_details: dict[str, int] = {"cached_tokens": 0}
    if reply.image_tokens:
        prompt_details["text_tokens"] = reply.input_tokens - reply.image_tokens
        prompt_details["image_tokens"] = reply.image_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": reply.input_tokens,
        "completion_tokens": reply.output_tokens,
        "total_tokens": reply.total_tokens,
        "prompt_tokens_details": prompt_details,
    }
    if reply.reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
    return usage


def _native_payload(call: _Call, request_id: str) -> dict[str, Any]:
    reply = call.reply
    multimodal = call.route == "multimodal"
    message: dict[str, Any] = {"role": "assistant"}
    message["content"] = [{"text": reply.content}] if multimodal else reply.content
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if not multimodal and call.parameters.get("result_format") == "text":
        output: dict[str, Any] = {"text": reply.content, "finish_reason": reply.finish_reason}
    else:
        output = {"choices": [{"finish_reason": reply.finish_reason, "message": message}]}
    return {"output": output, "usage": _native_usage(reply, None, multimodal), "request_id": request_id}


def _native_events(call: _Call, request_id: str, pieces: list[_Piece], finished: bool) -> list[bytes]:
    """The ``event:result`` events of ``pieces``; the last one ends the reply if ``finished``."""
    reply = call.reply
    multimodal = call.route == "multimodal"
    text_format = not multimodal and call.parameters.get("result_format") == "text"
    incremental = call.parameters.get("incremental_output") is True
    events = []
    for index, piece in enumerate(pieces):
        finish = reply.finish_reason if finished and index == len(pieces) - 1 else "null"
        text = piece.content if incremental else piece.content_so_far
        if text_format:
            output: dict[str, Any] = {"text": text, "finish_reason": finish}
        else:
            if multimodal:
                content: Any = [] if piece.reasoning else [{"text": text}]
            else:
                content = text
            message: dict[str, Any] = {"content": content, "role": "assistant"}
            if reply.reasoning is not None:
                message["reasoning_content"] = piece.reasoning
            output = {"choices": [{"message": message, "finish_reason": finish}]}
        data = {"output": output, "usage": _native_usage(reply, piece, multimodal), "request_id": request_id}
        events.append(_native_event(index + 1, "result", 200, data))
    return events


def _openai_payload(call: _Call, request_id: str) -> dict[str, Any]:
    reply = call.reply
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    return {
        "choices": [{"message": message, "finish_reason": reply.finish_reason, "index": 0, "logprobs": None}],
        "object": "chat.completion",
        "usage": _openai_usage(reply),
        "created": int(time.time()),
        "system_fingerprint": None,
        "model": call.model,
        "id": f"chatcmpl-{request_id}",
    }


def _openai_events(call: _Call, request_id: str, pieces: list[_Piece], finished: bool) -> list[bytes]:
    """The chunks of ``pieces``; if ``finished``, also the usage chunk asked for and [DONE]."""
    reply = call.reply
    head = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": call.model,
    }
    events = []
    for index, piece in enumerate(pieces):
        finish = reply.finish_reason if finished and index == len(pieces) - 1 else None
        delta: dict[str, Any] = {"role": "assistant"}
        if piece.reasoning:
            delta.update(content=None, reasoning_content=piece.reasoning)
        else:
            delta["content"] = piece.content
            if reply.reasoning is not None:
                delta["reasoning_content"] = None
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        events.append(_openai_event({**head, "choices": [choice], "usage": None}))
    if finished:
        if call.include_usage:
            events.append(_openai_event({**head, "choices": [], "usage": _openai_usage(reply)}))
        events.append(_OPENAI_DONE)
    return events


def _error_answer(route: str, stream: bool, error: _ApiError, request_id: str) -> _Answer:
    """An error in the words of the route: native JSON, a native ``event:error``, or OpenAI JSON."""
    if route == "openai":
        status, payload = _openai_error(error, request_id)
        return _Answer(status, error.outcome, payload=payload)
    data = _error_payload(error.code, error.message, request_id)
    if stream:
        # A streamed call's errors come under HTTP 200, the real status in the comment line.
        return _Answer(200, error.outcome, events=[_native_event(1, "error", error.status, data)])
    return _Answer(error.status, error.outcome, payload=data)


def _success_answer(call: _Call, request_id: str) -> _Answer:
    reply = call.reply
    output_error = _ApiError(*_OUTPUT_INSPECTION, f"error:{_OUTPUT_INSPECTION[1]}")
    if not call.stream:
        if call.output_inspection:
            return _error_answer(call.route, False, output_error, request_id)
        render_payload = _openai_payload if call.route == "openai" else _native_payload
        payload = render_payload(call, request_id)
        return _Answer(200, "ok", payload=payload, content=reply.content, total_tokens=reply.total_tokens)

    pieces = _stream_pieces(reply)
    render = _openai_events if call.route == "openai" else _native_events
    if call.output_inspection:
        # Output moderation runs on what is generated: a few events go out before it strikes.
        events = render(call, request_id, pieces[:2], False)
        if call.route == "openai":
            _, body = _openai_error(output_error, request_id)
            events.append(_openai_event(body))
        else:
            data = _error_payload(output_error.code, output_error.message, request_id)
            events.append(_native_event(len(events) + 1, "error", output_error.status, data))
        return _Answer(200, output_error.outcome, events=events)
    events = render(call, request_id, pieces, True)
    return _Answer(200, "ok", events=events, content=reply.content, total_tokens=reply.total_tokens)
