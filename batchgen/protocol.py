"""DashScope's native chat protocol as pure functions: routes, request bodies, replies, errors.

Nothing here does I/O, so every rule can be tested against recorded bodies
(``tests/test_protocol.py``). Facts come from the official SDK and captured traffic; see
``shared/dashscope-protocol.md``.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Route = Literal["text", "multimodal"]
Api = Literal["dashscope", "openai"]

ROUTE_PATHS: dict[str, str] = {
    "text": "/services/aigc/text-generation/generation",
    "multimodal": "/services/aigc/multimodal-generation/generation",
}

# DashScope's gateway refuses bodies over 16 MiB, or 64 MiB when they carry base64 images.
MAX_BODY = 16 * 1024 * 1024
MAX_BODY_BASE64 = 64 * 1024 * 1024
TOO_LARGE = "batchgen.TooLarge"

COMPATIBLE_PREFIX = "/compatible-mode/v1"  # the OpenAI-compatible API on the same hosts
CHAT_PATH = "/chat/completions"  # under an OpenAI-compatible base URL
NATIVE_PREFIX = "/api/v1"

REGION_BASE_URLS: dict[str, str] = {
    "intl": "https://dashscope-intl.aliyuncs.com/api/v1",
    "us": "https://dashscope-us.aliyuncs.com/api/v1",
    "cn": "https://dashscope.aliyuncs.com/api/v1",
    "hk": "https://cn-hongkong.dashscope.aliyuncs.com/api/v1",
}
# Region names as Alibaba Cloud writes them, accepted so DASHSCOPE_API_REGION set for the SDK works.
REGION_ALIASES: dict[str, str] = {
    "ap-southeast-1": "intl",
    "singapore": "intl",
    "us-east-1": "us",
    "virginia": "us",
    "cn-beijing": "cn",
    "beijing": "cn",
    "cn-hongkong": "hk",
    "hongkong": "hk",
}

# qwen3.5 / 3.6 / 3.7 answer "url error" on the text route even for text-only input;
# VL, QVQ and omni models are multimodal by nature.
_MULTIMODAL_MODEL = re.compile(r"^qwen3\.[5-9]|(^|[-_.])vl([-_.]|$)|^qvq|omni")


def route_for_model(model: str) -> Route:
    """The route DashScope serves ``model`` on."""
    return "multimodal" if _MULTIMODAL_MODEL.search(model.lower()) else "text"


# Open-source Qwen3 checkpoints (qwen3-8b, qwen3-235b-a22b, ...) think by default and think
# only in streamed calls; QwQ / QVQ always think; omni models answer only streamed.
_OPEN_QWEN3 = re.compile(r"^qwen3-\d+(\.\d+)?b(-a\d+(\.\d+)?b)?$")
_STREAM_ONLY = re.compile(r"^(qwq|qvq)|omni|^qwen3-[\w.-]*-thinking")


def needs_stream(model: str, parameters: Mapping[str, Any]) -> bool:
    """Whether DashScope answers ``model`` with these parameters only as a streamed call.

    Non-streamed, such requests fail ("parameter.enable_thinking must be set to false for
    non-streaming calls", "... only support stream ..."). The simulator has the same rule
    (``simulator.only_streamed``); ``tests/test_wire.py`` holds the two equal.
    """
    name = model.lower()
    if _STREAM_ONLY.search(name):
        return True
    return bool(_OPEN_QWEN3.match(name)) and parameters.get("enable_thinking") is not False


def stream_by_default(model: str, parameters: Mapping[str, Any]) -> bool:
    """batchgen's choice without --stream/--no-stream: streamed where required, and whenever
    thinking is asked for (DashScope refuses some hybrids' unstreamed thinking too, with
    "enable_thinking must be set to false for non-streaming calls"; streaming costs nothing)."""
    return needs_stream(model, parameters) or parameters.get("enable_thinking") is True


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


def _text_of(content: Any) -> str | None:
    """Message content as a string: the text route gives a string, the multimodal a parts list.

    No text is None, never "": a tool call or a reply cut while thinking has ``"content": ""``.
    """
    if content is None or isinstance(content, str):
        return content or None
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) or None
    return str(content)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def parse_reply(body: Mapping[str, Any], request_id: str | None = None) -> Reply:
    """Flatten a 200 body. Every usage sub-object may be missing, so each is read defensively."""
    output = _dict(body.get("output"))
    choices = output.get("choices")
    choice = _dict(choices[0]) if isinstance(choices, list) and choices else {}
    message = _dict(choice.get("message"))
    content = _text_of(message.get("content"))
    if content is None and isinstance(output.get("text"), str):  # result_format "text" replies
        content = output["text"]
    finish = choice.get("finish_reason", output.get("finish_reason"))
    if finish == "null":  # streamed chunks carry the string "null" until the last one
        finish = None
    usage = _dict(body.get("usage"))
    prompt_details = _dict(usage.get("prompt_tokens_details"))
    output_details = _dict(usage.get("output_tokens_details"))
    input_tokens = _int_or_none(usage.get("input_tokens"))
    output_tokens = _int_or_none(usage.get("output_tokens"))
    total = _int_or_none(usage.get("total_tokens"))
    if total is None and input_tokens is not None and output_tokens is not None:
        total = input_tokens + output_tokens
    request = body.get("request_id")
    return Reply(
        content=content,
        reasoning=_text_of(message.get("reasoning_content")),
        finish_reason=finish if isinstance(finish, str) else None,
        request_id=request if isinstance(request, str) and request else request_id,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=total,
        cached_tokens=_int_or_none(prompt_details.get("cached_tokens")),
        reasoning_tokens=_int_or_none(output_details.get("reasoning_tokens")),
    )


def _has_answer(body: Mapping[str, Any]) -> bool:
    """A reply body has ``output.choices`` (a list) or ``output.text``; anything else is garbage."""
    output = body.get("output")
    return isinstance(output, dict) and (
        isinstance(output.get("choices"), list) or isinstance(output.get("text"), str)
    )


RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})

# Codes after which no other row of the run can succeed either.
_FATAL_CODES = frozenset(
    {
        "InvalidApiKey",
        "Arrearage",
        "AllocationQuota.FreeTierOnly",
        "Model.NotExist",
        "ModelNotFound",
        "BadRequest.EmptyModel",
        "InvalidURL",
        # OpenAI-compatible mode's names for the same verdicts
        "invalid_api_key",
        "model_not_found",
        "access_denied",
    }
)
# DashScope's compatible mode answers a token-rate overshoot (Throttling.AllocationQuota, which
# clears within the minute) with 429 "insufficient_quota" ("You exceeded your current quota ...
# #token-limit"): a throttle. Only these wordings of it mean that paying more is the fix.
_QUOTA_GONE = "free allocated quota exceeded"
_OPENAI_CREDIT = "platform.openai.com"  # OpenAI's own insufficient_quota: no credit left
# HTTP 200 bodies carrying one of these codes are transient server trouble, not a verdict.
_RETRYABLE_CODE_PREFIXES = (
    "Throttling",
    "InternalError",
    "ServiceUnavailable",
    "GatewayTimeout",
    "RequestTimeOut",
    "SystemError",
    "internal_error",
    "server_error",
    "limit_requests",
    "rate_limit",
    "insufficient_quota",
)


def classify(http_status: int | None, code: str, message: str) -> Disposition:
    """What to do after an error: a pure function of what the server said."""
    lowered = message.lower()
    if (
        code in _FATAL_CODES
        or code.startswith("AccessDenied")
        or _QUOTA_GONE in lowered
        or (code == "insufficient_quota" and _OPENAI_CREDIT in lowered)
        or "model not exist" in lowered
        or "url error" in lowered
        or "only support stream" in lowered
        or "non-streaming calls" in lowered
        or "stream=false" in lowered
    ):
        return Disposition.FATAL
    if http_status in (401, 403, 404):
        return Disposition.FATAL
    if http_status in RETRYABLE_STATUSES:
        return Disposition.RETRY
    if http_status == 200 or http_status is None:
        return Disposition.RETRY if code.startswith(_RETRYABLE_CODE_PREFIXES) else Disposition.ROW_ERROR
    return Disposition.ROW_ERROR  # 400 InvalidParameter, DataInspectionFailed, 413, ...


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date; DashScope sends none at all, so don't bother parsing it
        return None


def load_body(http_status: int, headers: Mapping[str, str], raw: bytes) -> dict[str, Any] | APIError:
    """A response body as a JSON object, or the transient fault it is when it is not one."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    code = "batchgen.BadResponse"
    detail = raw[:120].decode("utf-8", "replace").strip() or "empty body"
    message = f"HTTP {http_status} with a body that is not a JSON object: {detail}"
    disposition = (
        Disposition.RETRY
        if http_status in RETRYABLE_STATUSES or http_status < 400
        else classify(http_status, code, message)
    )
    return APIError(
        http_status, code, message, headers.get("x-request-id"), disposition, _retry_after(headers)
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
            _retry_after(headers),
        )
    code = str(code) if code else f"HTTP{http_status}"
    message = str(body.get("message") or "")
    return APIError(
        http_status, code, message, request_id, classify(http_status, code, message), _retry_after(headers)
    )


class StreamAssembler:
    """Builds one ``Reply`` from the chunks of a streamed answer, whatever the dialect.

    Chunks carry deltas (``incremental_output: true``; OpenAI streams always do) and the
    cumulative usage, so texts are joined and the last usage seen is kept. A stream that ends
    before its final chunk is a ``batchgen.StreamCut``, retried like a dropped connection.
    """

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id
        self.chunks = 0
        self.finished = False
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._finish: str | None = None
        self._usage: dict[str, int | None] = {}

    def merge(self, chunk: Reply) -> None:
        self.chunks += 1
        if chunk.request_id and not self.request_id:
            self.request_id = chunk.request_id
        if chunk.content:
            self._content.append(chunk.content)
        if chunk.reasoning:
            self._reasoning.append(chunk.reasoning)
        if chunk.finish_reason:
            self._finish = chunk.finish_reason
        for name in _USAGE_FIELDS:
            value = getattr(chunk, name)
            if value is not None:
                self._usage[name] = value

    @property
    def has_finish(self) -> bool:
        return self._finish is not None

    def cut(self, why: str) -> APIError:
        """The stream ended early: sent again (``Caller`` adds what it was billed)."""
        return APIError(
            200,
            "batchgen.StreamCut",
            f"{why} after {self.chunks} chunk{'s' if self.chunks != 1 else ''}",
            self.request_id,
            Disposition.RETRY,
        )

    def billed(self) -> tuple[int, int] | None:
        """(input, output) tokens as the last usage seen says, for a stream that broke off.

        DashScope's native chunks carry the usage so far; an OpenAI stream gives it only at the
        end, so a broken one's cost is not known (None).
        """
        tokens = (self._usage.get("input_tokens"), self._usage.get("output_tokens"))
        return (tokens[0] or 0, tokens[1] or 0) if any(tokens) else None

    def result(self) -> Reply | APIError:
        if not self.finished:
            return self.cut("the stream ended before its last chunk")
        usage = dict(self._usage)
        if usage.get("total_tokens") is None and None not in (
            usage.get("input_tokens"),
            usage.get("output_tokens"),
        ):
            usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]  # type: ignore[operator]
        return Reply(
            content="".join(self._content) or None,
            reasoning="".join(self._reasoning) or None,
            finish_reason=self._finish,
            request_id=self.request_id,
            **{name: usage.get(name) for name in _USAGE_FIELDS},
        )


_USAGE_FIELDS = ("input_tokens", "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def _stream_error(status: int, raw: str, request_id: str | None) -> APIError:
    detail = raw[:120].strip() or "empty"
    return APIError(
        status,
        "batchgen.BadResponse",
        f"a stream event that is not a JSON object: {detail}",
        request_id,
        Disposition.RETRY,
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
            return _stream_error(status, event.data, self.request_id)
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


_STREAM_HINT = (
    "this model or mode answers only streamed calls: drop --no-stream (batchgen "
    "streams such models and every thinking request by itself), or turn thinking "
    "off with --disable-thinking where the model allows it"
)

# One line per fatal cause: what happened and what the user can do about it.
_FATAL_HINTS: tuple[tuple[str, str], ...] = (
    (
        "batchgen.Unreachable",
        "the service cannot be reached: check --base-url / --region, the "
        "network and any proxy (HTTPS_PROXY, NO_PROXY)",
    ),
    (
        "invalid_api_key",
        "the server rejected the API key: check DASHSCOPE_API_KEY (or "
        "OPENAI_API_KEY with --api openai) and its region",
    ),
    (
        "InvalidApiKey",
        "DashScope rejected the API key: check DASHSCOPE_API_KEY, and that the key "
        "belongs to the region of the base URL (--region / --base-url)",
    ),
    ("Arrearage", "the Alibaba Cloud account is overdue: top up the account, then re-run"),
    (
        "AllocationQuota.FreeTierOnly",
        "the model's free tier is used up and the account is in "
        "free-tier-only mode: turn that off in the Model Studio console",
    ),
    (
        "free allocated quota exceeded",
        "the free quota of this model is used up: enable paid usage "
        "in the Model Studio console or pick another model",
    ),
    (
        "AccessDenied",
        "the account or workspace may not use this model: check the model name and "
        "--workspace / DASHSCOPE_WORKSPACE_ID, or buy access in the console",
    ),
    (
        "url error",
        "the model is not served on this route: qwen3.5+/VL/omni models need "
        "--endpoint multimodal, text models --endpoint text",
    ),
    ("non-streaming calls", _STREAM_HINT),
    ("only support stream", _STREAM_HINT),
    ("model not exist", "no such model in this region: check -m/--model and --region"),
    ("Model.NotExist", "no such model in this region: check -m/--model and --region"),
    ("model_not_found", "no such model on this server: check -m/--model"),
    ("insufficient_quota", "the account's quota or credit is used up: top it up or pick another model"),
    ("ModelNotFound", "no such model in this region: check -m/--model and --region"),
    ("NotFound", "the endpoint was not found: check --base-url / DASHSCOPE_HTTP_BASE_URL"),
)


def fatal_hint(error: APIError) -> str:
    """The one-line explanation printed when a run stops on ``error``."""
    haystack = f"{error.code} {error.message}".lower()
    hint = next(
        (hint for needle, hint in _FATAL_HINTS if needle.lower() in haystack),
        "the service refused the request for every row",
    )
    status = f"HTTP {error.http_status} " if error.http_status else ""
    said = f" ({error.message.strip()})" if error.message.strip() else ""
    return f"{status}{error.code}{said}: {hint}"
