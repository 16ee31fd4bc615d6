"""A batch's input file checked as the Batch API validates it, and each line answered as the chat route would.

Validation runs when a batch leaves ``validating``. Any problem fails the whole batch (no line
runs, nothing is billed); each bad line is reported once, for its first problem, as an entry
``{"code", "message", "param", "line"}`` of ``errors.data`` with its 1-based line number (blank
lines count, and are otherwise skipped). The codes, in the order the checks run:

- ``empty_file`` (line null): no request line at all.
- ``too_many_requests`` (line null): more lines than ``BatchLimits.lines`` (test model: 100).
- ``file_too_large`` (line null): a test-model file over ``BatchLimits.test_file_bytes`` (1 MB).
- ``line_too_large``: a line over ``BatchLimits.line_bytes`` (6 MB).
- ``invalid_json_line``: a line that is not a JSON object.
- ``missing_required_parameter`` (param: the field): custom_id, method or url missing or not a
  non-empty string, body not an object, body.model missing or not a non-empty string.
- ``invalid_method`` (method): a method other than POST.
- ``url_not_found`` (url): a url the Batch API does not serve.
- ``mismatched_url`` (url): a url the Batch API serves, but not the batch's endpoint.
- ``duplicate_custom_id`` (custom_id): a custom_id an earlier line used.
- ``model_not_found`` (body.model): an unknown model, or another than batch-test-model on ds-test.
- ``mismatched_model`` (body.model): a model other than the first valid line's.
- ``mismatched_thinking_mode`` (body.enable_thinking): thinking on where the first valid line's
  is off, or off where it is on, as the model's default and ``enable_thinking`` make it.

``url_not_found``, ``invalid_json_line``, ``duplicate_custom_id`` and ``mismatched_model`` carry
the real service's (or OpenAI's) messages; the other codes are this simulator's best guess at
codes the documentation does not list. At most :data:`_MAX_ERRORS` entries are reported.

A line's body is answered exactly as ``POST /compatible-mode/v1/chat/completions`` answers it
unstreamed (same validation, markers and :func:`simulated_reply`), with three differences that
are the Batch API's: ``stream``/``stream_options`` are dropped, the models that answer only
streamed calls answer anyway (the batch runs them itself), and ``created`` is the simulated time
the line ran. ``batch-test-model`` on ``/v1/chat/ds-test`` never reaches a model: it answers
"This is a test result." with usage 20/6.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from batchgen.simulator.config import BatchLimits
from batchgen.simulator.errors import _MSG_INTERNAL, _OUTPUT_INSPECTION, _ApiError, _openai_error
from batchgen.simulator.models import _KNOWN_MODEL_RE, _thinks
from batchgen.simulator.replies import simulated_reply
from batchgen.simulator.validation import (
    _check_images,
    _check_markers,
    _check_response_format,
    _check_route,
)
from batchgen.simulator.wire import _Call, _openai_payload

CHAT_ENDPOINT = "/v1/chat/completions"
TEST_ENDPOINT = "/v1/chat/ds-test"
TEST_MODEL = "batch-test-model"
# The urls the real Batch API serves; the simulator has no embedding models, so a batch may
# name /v1/embeddings in its lines (and be told it mismatches) but not as its endpoint.
SERVED_URLS = frozenset({CHAT_ENDPOINT, TEST_ENDPOINT, "/v1/embeddings"})
_MAX_ERRORS = 100

_MSG_NOT_JSON = "This line is not parseable as valid JSON."
_MSG_EXPIRED = "This request could not be executed before the completion window expired."
_MSG_CANCELLED = "This request was not executed because the batch was cancelled."
_TEST_REPLY = "This is a test result."


@dataclass(frozen=True)
class _Line:
    """One valid request line of an input file."""

    number: int  # 1-based, counting blank lines
    custom_id: str
    body: dict[str, Any]


class _Invalid(Exception):
    """A line's first problem, as an ``errors.data`` entry."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _error_entry(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def validate_file(
    content: bytes, endpoint: str, limits: BatchLimits
) -> tuple[list[_Line], dict[str, Any] | None]:
    """The valid lines of an input file, or the ``errors`` object that fails the batch."""
    numbered = [
        (number, raw.removesuffix(b"\r"))
        for number, raw in enumerate(content.split(b"\n"), start=1)
        if raw.strip()
    ]
    test = endpoint == TEST_ENDPOINT
    file_problem = None
    if not numbered:
        file_problem = ("empty_file", "The batch input file is empty.")
    elif len(numbered) > (max_lines := limits.test_lines if test else limits.lines):
        file_problem = (
            "too_many_requests",
            f"The batch input file has {len(numbered)} requests, more than the maximum of {max_lines}.",
        )
    elif test and len(content) > limits.test_file_bytes:
        file_problem = (
            "file_too_large",
            f"A batch input file for {TEST_MODEL} may be at most {limits.test_file_bytes} bytes.",
        )
    if file_problem is not None:
        return [], _errors([_error_entry(*file_problem, None, None)])

    lines: list[_Line] = []
    entries: list[dict[str, Any]] = []
    first: tuple[str, bool] | None = None  # (model, thinks) of the first valid line
    seen: set[str] = set()
    for number, raw in numbered:
        try:
            line = _parse_line(number, raw, endpoint, limits)
            first = _check_consistent(line, first, seen, test)
        except _Invalid as problem:
            entries.append(_error_entry(problem.code, problem.message, problem.param, number))
            if len(entries) == _MAX_ERRORS:
                break
            continue
        lines.append(line)
    return (lines, None) if not entries else ([], _errors(entries))


def _errors(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": entries}


def _parse_line(number: int, raw: bytes, endpoint: str, limits: BatchLimits) -> _Line:
    """A line on its own: size, JSON, the required fields, method and url."""
    if len(raw) > limits.line_bytes:
        raise _Invalid(
            "line_too_large", f"This line is larger than the maximum of {limits.line_bytes} bytes."
        )
    try:
        request = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        raise _Invalid("invalid_json_line", _MSG_NOT_JSON) from None
    if not isinstance(request, dict):
        raise _Invalid("invalid_json_line", _MSG_NOT_JSON)
    for name in ("custom_id", "method", "url"):
        if not isinstance(request.get(name), str) or not request[name]:
            raise _Invalid("missing_required_parameter", f"Missing required parameter: '{name}'.", name)
    body = request.get("body")
    if not isinstance(body, dict):
        raise _Invalid("missing_required_parameter", "Missing required parameter: 'body'.", "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _Invalid(
            "missing_required_parameter", "Missing required parameter: 'body.model'.", "body.model"
        )
    if request["method"] != "POST":
        raise _Invalid(
            "invalid_method", f"The method '{request['method']}' is not supported; use POST.", "method"
        )
    url = request["url"]
    if url not in SERVED_URLS:
        raise _Invalid("url_not_found", f"The provided url '{url}' is not supported by the Batch API.", "url")
    if url != endpoint:
        message = f"The url '{url}' of this request does not match the batch's endpoint '{endpoint}'."
        raise _Invalid("mismatched_url", message, "url")
    return _Line(number, request["custom_id"], body)


def _check_consistent(
    line: _Line, first: tuple[str, bool] | None, seen: set[str], test: bool
) -> tuple[str, bool]:
    """A line against the others: unique custom_id, one known model, one thinking mode."""
    if line.custom_id in seen:
        raise _Invalid(
            "duplicate_custom_id",
            f"The custom_id '{line.custom_id}' for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch.",
            "custom_id",
        )
    seen.add(line.custom_id)
    model = line.body["model"]
    if test and model != TEST_MODEL:
        message = f"The model '{model}' cannot be used on {TEST_ENDPOINT}; use {TEST_MODEL}."
        raise _Invalid("model_not_found", message, "body.model")
    if not _KNOWN_MODEL_RE.match(model):
        message = f"The model '{model}' does not exist or you do not have access to it."
        raise _Invalid("model_not_found", message, "body.model")
    thinks = _thinks(model, line.body.get("enable_thinking"))
    if first is None:
        return model, thinks
    if model != first[0]:
        raise _Invalid(
            "mismatched_model",
            f"The model '{model}' for this request does not match the rest of the batch. "
            "Each batch must contain requests for a single model.",
            "body.model",
        )
    if thinks != first[1]:
        mode, other = ("on", "off") if thinks else ("off", "on")
        message = (
            f"Thinking is {mode} for this request but {other} for the rest of the batch. Each batch "
            "must use a single thinking mode: set enable_thinking the same way on every line."
        )
        raise _Invalid("mismatched_thinking_mode", message, "body.enable_thinking")
    return first


def answer_line(
    line: _Line, endpoint: str, request_id: str, created: int, *, internal_error: bool
) -> tuple[dict[str, Any], bool]:
    """The output line for ``line``, run at unix time ``created``, and whether it succeeded.

    ``internal_error``: the line fails with the chat route's 500, as a fault.
    """
    status, body = 200, None
    if endpoint == TEST_ENDPOINT:
        body = _test_reply(created)
    elif internal_error:
        status, body = _error_body(_ApiError(500, "InternalError", _MSG_INTERNAL, "fault_500"), request_id)
    else:
        try:
            call = _call(line.body)
        except _ApiError as error:
            status, body = _error_body(error, request_id)
        else:
            body = {**_openai_payload(call, request_id), "created": created}
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {"id": request_id, "custom_id": line.custom_id, "response": response, "error": None}, status == 200


def not_run_line(line: _Line, reason: str) -> dict[str, Any]:
    """The error-file line of a request that never ran: ``batch_expired`` or ``batch_cancelled``."""
    message = _MSG_EXPIRED if reason == "batch_expired" else _MSG_CANCELLED
    return {
        "id": str(uuid.uuid4()),
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": reason, "message": message},
    }


def _call(body: dict[str, Any]) -> _Call:
    """The chat route's checks and reply for an unstreamed body (server._prepare's, without the
    stream-only refusal, the quotas and the latency, none of which a batch line meets)."""
    body = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
    model, messages, parameters, _, _ = _check_route("openai", body, False)
    _check_images("openai", model, messages)
    response_format = _check_response_format(parameters.get("response_format"), messages)
    if _check_markers(messages):
        raise _ApiError(*_OUTPUT_INSPECTION, f"error:{_OUTPUT_INSPECTION[1]}")
    reply = simulated_reply(
        model,
        messages,
        max_tokens=parameters.get("max_tokens"),
        enable_thinking=parameters.get("enable_thinking"),
        thinking_budget=parameters.get("thinking_budget"),
        response_format=response_format,
    )
    return _Call("openai", model, parameters, reply, False, False, False)


def _error_body(error: _ApiError, request_id: str) -> tuple[int, dict[str, Any]]:
    status, payload = _openai_error(error, request_id)
    return status, {"error": payload["error"]}


def _test_reply(created: int) -> dict[str, Any]:
    # As the documentation shows it: no role, no usage details, an id of its own.
    return {
        "created": created,
        "usage": {"completion_tokens": 6, "prompt_tokens": 20, "total_tokens": 26},
        "model": TEST_MODEL,
        "id": f"chatcmpl-{uuid.uuid4()}",
        "choices": [{"finish_reason": "stop", "index": 0, "message": {"content": _TEST_REPLY}}],
        "object": "chat.completion",
    }
