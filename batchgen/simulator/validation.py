"""Request bodies checked as the service checks them, on the native and the OpenAI route."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from batchgen.simulator.errors import (
    _MARKER_RE,
    _MARKERS,
    _MSG_EMPTY_INPUT,
    _MSG_EMPTY_MODEL,
    _MSG_INCREMENTAL,
    _MSG_JSON_WORD,
    _MSG_MODEL_NOT_EXIST,
    _MSG_STREAM_ONLY,
    _MSG_THINKING_STREAM_ONLY,
    _MSG_URL_ERROR,
    _ApiError,
    _bad_request,
)
from batchgen.simulator.images import _image_problem, _image_values
from batchgen.simulator.jsonreplies import _is_int, _is_number, _schema_problem
from batchgen.simulator.models import (
    _KNOWN_MODEL_RE,
    _STREAM_ONLY_RE,
    _is_multimodal_model,
    _thinks,
    only_streamed,
)
from batchgen.simulator.text import _message_text

_ROLES = frozenset({"system", "user", "assistant", "tool"})


# (name, is_valid, message). NaN fails every comparison, so it is rejected too.
_PARAMETER_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    (
        "temperature",
        lambda v: _is_number(v) and 0.0 <= v < 2.0,
        "Range of temperature should be [0.0, 2.0)",
    ),
    ("top_p", lambda v: _is_number(v) and 0.0 < v <= 1.0, "Range of top_p should be (0.0, 1.0]"),
    ("top_k", lambda v: _is_int(v) and v >= 0, "Parameter top_k should be an integer >= 0"),
    (
        "max_tokens",
        lambda v: _is_int(v) and v >= 1,
        "Parameter max_tokens should be an integer >= 1",
    ),
    (
        "seed",
        lambda v: _is_int(v) and 0 <= v <= 2**31 - 1,
        "Range of seed should be [0, 2147483647]",
    ),
    ("n", lambda v: _is_int(v) and 1 <= v <= 4, "Range of n should be [1, 4]"),
    (
        "presence_penalty",
        lambda v: _is_number(v) and -2.0 <= v <= 2.0,
        "Range of presence_penalty should be [-2.0, 2.0]",
    ),
    (
        "thinking_budget",
        lambda v: _is_int(v) and v > 0,
        "Parameter thinking_budget should be a positive integer",
    ),
    (
        "enable_thinking",
        lambda v: isinstance(v, bool),
        "Parameter enable_thinking should be a boolean",
    ),
    (
        "incremental_output",
        lambda v: isinstance(v, bool),
        "Parameter incremental_output should be a boolean",
    ),
    (
        "stop",
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "Parameter stop should be a string or a list of strings",
    ),
)


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad_request(_MSG_EMPTY_INPUT, "BadRequest.EmptyInput")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _bad_request("Role must be in [system, user, assistant, tool].")
        content = message.get("content")
        # An assistant turn that only calls tools legitimately has no content.
        if not content and not (message["role"] == "assistant" and message.get("tool_calls")):
            raise _bad_request("Content of a message must not be empty.")
        if content and not isinstance(content, str | list):
            raise _bad_request("Content of a message should be a string or a list of parts.")
        if isinstance(content, list) and not all(isinstance(p, dict) for p in content):
            raise _bad_request("Each part of a message content should be an object.")
    return messages


def _check_parameters(parameters: dict[str, Any]) -> None:
    for name, is_valid, message in _PARAMETER_RULES:
        value = parameters.get(name)
        if value is not None and not is_valid(value):
            raise _bad_request(message)


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model:
        raise _bad_request(_MSG_EMPTY_MODEL, "BadRequest.EmptyModel")
    return model


def _validate(body: Any) -> tuple[str, list[dict], dict[str, Any]]:
    """Check a native request body as DashScope does; return (model, messages, parameters)."""
    if not isinstance(body, dict):
        raise _bad_request("The request body should be a JSON object.")
    model = _check_model(body.get("model"))
    input_ = body.get("input")
    messages = _check_messages(input_.get("messages") if isinstance(input_, dict) else None)
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise _bad_request("The parameters should be a JSON object.")
    _check_parameters(parameters)
    return model, messages, parameters


# OpenAI part type -> native part key. Video and audio are accepted and ignored, as natively.
_OPENAI_PARTS = {"image_url": "image", "video_url": "video", "video": "video", "input_audio": "audio"}


def _native_message(message: Any) -> Any:
    """An OpenAI message with its content parts rewritten as native ones; the rest untouched."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts: list[Any] = []
    for part in message["content"]:
        if not isinstance(part, dict):
            parts.append(part)  # refused by _check_messages, in the native words
            continue
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad_request("A text content part should have a string text.")
            parts.append({"text": part["text"]})
        elif kind in _OPENAI_PARTS:
            value = part.get(kind)
            if isinstance(value, dict) and kind != "input_audio":
                value = value.get("url")
            parts.append({_OPENAI_PARTS[kind]: value})
        else:
            raise _bad_request(
                f"Unsupported content part type {kind!r}; expected text, image_url, video_url, video "
                "or input_audio."
            )
    return {**message, "content": parts}


def _validate_openai(body: Any) -> tuple[str, list[dict], dict[str, Any], bool, bool]:
    """Check an OpenAI-compatible body; return (model, native messages, parameters, stream,
    include_usage). Parameters are the top-level keys besides these, checked by the native rules."""
    if not isinstance(body, dict):
        raise _bad_request("The request body should be a JSON object.")
    model = _check_model(body.get("model"))
    messages = body.get("messages")
    if isinstance(messages, list):
        messages = [_native_message(message) for message in messages]
    messages = _check_messages(messages)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad_request("Parameter stream should be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad_request("Parameter stream_options should be an object")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _bad_request("Parameter stream_options.include_usage should be a boolean")
    own_keys = ("model", "messages", "stream", "stream_options")
    parameters = {key: value for key, value in body.items() if key not in own_keys}
    _check_parameters(parameters)
    return model, messages, parameters, bool(stream), bool(include_usage)


_JSON_SCHEMA_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_response_format(value: Any, messages: list[dict]) -> dict | None:
    """Validate ``response_format``; return it when it asks for JSON, else None."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str):
        raise _bad_request(
            "Parameter response_format should be an object with a type: text, json_object or json_schema."
        )
    if kind == "text":
        return None
    if kind == "json_object":
        if not any("json" in _message_text(message).lower() for message in messages):
            raise _bad_request(_MSG_JSON_WORD)
        return value
    if kind != "json_schema":
        raise _bad_request(
            f"Unsupported response_format type {kind!r}; expected text, json_object or json_schema."
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad_request(
            "Parameter response_format.json_schema should be an object with a name and a schema."
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _JSON_SCHEMA_NAME_RE.fullmatch(name):
        raise _bad_request(
            "Parameter response_format.json_schema.name should be 1 to 64 letters, digits, '_' or '-'."
        )
    if "strict" in spec and not isinstance(spec["strict"], bool | None):
        raise _bad_request("Parameter response_format.json_schema.strict should be a boolean.")
    if "schema" not in spec:
        raise _bad_request("Parameter response_format.json_schema.schema is missing.")
    if problem := _schema_problem(spec["schema"], "schema"):
        raise _bad_request(f"Invalid JSON schema in response_format.json_schema: {problem}.")
    return value


def _check_route(route: str, body: Any, sse: bool) -> tuple[str, list[dict], dict[str, Any], bool, bool]:
    """Check the body in its route's protocol and the model against the route; return (model,
    native messages, parameters, stream, include_usage). ``sse``: the native stream header."""
    if route == "openai":
        model, messages, parameters, stream, include_usage = _validate_openai(body)
        if not _KNOWN_MODEL_RE.match(model):
            missing = f"The model `{model}` does not exist or you do not have access to it."
            openai = (404, "model_not_found", "invalid_request_error", missing)
            raise _ApiError(400, "InvalidParameter", _MSG_MODEL_NOT_EXIST, "bad_request_400", openai=openai)
        return model, messages, parameters, stream, include_usage
    model, messages, parameters = _validate(body)
    if not _KNOWN_MODEL_RE.match(model):
        raise _bad_request(_MSG_MODEL_NOT_EXIST)
    multimodal = route == "multimodal"
    if multimodal != _is_multimodal_model(model):
        raise _bad_request(_MSG_URL_ERROR)
    if multimodal and not all(isinstance(m.get("content"), list) for m in messages):
        raise _bad_request('Content of every message should be a list of parts, e.g. [{"text": "..."}].')
    return model, messages, parameters, sse, False


def _check_images(route: str, model: str, messages: list[dict]) -> None:
    """Images only on a route and a model that take them, and only the kinds the service reads."""
    images = _image_values(messages)
    if images and route == "text":
        raise _bad_request(
            "Image input is not supported on the text-generation route; send images to a vision "
            "model on the multimodal-generation route."
        )
    if images and not _is_multimodal_model(model):
        raise _bad_request(f"The model {model} does not support image input.")
    for image in images:
        if problem := _image_problem(image):
            raise _bad_request(problem)


def _check_streaming(route: str, model: str, parameters: dict[str, Any], stream: bool) -> None:
    """Stream-only models refuse plain calls; a thinking native stream must be incremental."""
    if not stream and only_streamed(model, parameters):
        always = _STREAM_ONLY_RE.match(model)
        raise _bad_request(_MSG_STREAM_ONLY if always else _MSG_THINKING_STREAM_ONLY)
    thinking = _thinks(model, parameters.get("enable_thinking"))
    if stream and route != "openai" and thinking and parameters.get("incremental_output") is not True:
        raise _bad_request(_MSG_INCREMENTAL)


def _check_markers(messages: list[dict]) -> bool:
    """Raise the error a test marker asks for; say whether the output is to fail moderation."""
    output_inspection = False
    for message in messages:
        text = _message_text(message)
        if "[sim:" in text:
            for name in _MARKER_RE.findall(text):
                if name in _MARKERS:
                    status, code, error_message = _MARKERS[name]
                    raise _ApiError(status, code, error_message, f"error:{code}")
                output_inspection = output_inspection or name == "OutputInspection"
    return output_inspection
