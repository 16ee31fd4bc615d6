"""A local DashScope server that speaks the chat protocols over real HTTP.

The end-to-end tests, the README demo and the benchmarks need a DashScope that is free,
offline, fast and misbehaves on demand. A transport-level fake would only test what its author
believed about the protocol; a real server on loopback makes the client go through its actual
connection pool, timeouts, retries, JSON and event-stream parsing. So this module answers
exactly what the real service answers (routes, JSON shapes, error codes and messages, the
``x-request-id`` header), and adds, on top, what the real service does only on a bad day:
throttling, 5xx, dropped connections, truncated bodies and cut streams, hangs and HTTP 200
business errors.

Three routes, each counted in :attr:`SimulatorStats.routes`:

- ``text`` (:data:`TEXT_PATH`) and ``multimodal`` (:data:`MULTIMODAL_PATH`), the native
  protocol. Each model answers on its own route only ("url error" otherwise). With the header
  ``X-DashScope-SSE: enable`` the answer is an event stream (``id:``/``event:``/
  ``:HTTP_STATUS/``/``data:`` events, no ``[DONE]``), and every error of that request arrives
  as one ``event:error`` under HTTP 200, as the real gateway does it (the HTTP 200 business
  error of ``fault_200_error`` too: its event says ``:HTTP_STATUS/500``). The multimodal route
  takes images (http(s) URLs, never fetched, or ``data:image/...;base64`` URIs), each billed
  :data:`IMAGE_TOKENS` input tokens and named in the reply by :func:`image_id`.
- ``openai`` (:data:`COMPATIBLE_PATH`, at the host root, not under ``/api/v1``): the
  OpenAI-compatible chat completions, for any model, with OpenAI's body, reply, chunk and
  error shapes (see ``_OPENAI_ERRORS`` for how native errors map onto it).

Both protocols share the key check, the quotas, the faults, the latency, the models, the
validation rules, the test markers, ``response_format`` (JSON object or JSON schema replies)
and the models that answer only streamed calls (:func:`only_streamed`).

Replies are a pure function of the request (:func:`simulated_reply`), so a test can compute the
answer it expects, and a resumed run must reproduce byte-identical results; a streamed answer
joins up to exactly the non-streamed one. Only the fault and latency draws are random, from
their own seeded RNG.

Usage from async code::

    sim = Simulator(SimulatorConfig(fault_500=0.1))
    base_url = await sim.start()
    ...
    await sim.stop()

and from sync code (tests, ``batchgen run --simulate``)::

    with SimulatorThread(SimulatorConfig(rpm=600)) as sim:
        run_things_against(sim.base_url)  # sim.compatible_base_url for the OpenAI route
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import math
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from aiohttp import web

__all__ = [
    "COMPATIBLE_PATH",
    "DEMO_KEY",
    "IMAGE_TOKENS",
    "MULTIMODAL_PATH",
    "TEXT_PATH",
    "SimReply",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "SimulatorThread",
    "TokenBucket",
    "count_tokens",
    "image_id",
    "only_streamed",
    "serve_forever",
    "simulated_reply",
]

DEMO_KEY = "sk-simulator-demo-key"

TEXT_PATH = "/api/v1/services/aigc/text-generation/generation"
MULTIMODAL_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
# The OpenAI-compatible mode lives beside /api/v1 on the same host, not under it.
COMPATIBLE_PATH = "/compatible-mode/v1/chat/completions"
_ROUTES = {TEXT_PATH: "text", MULTIMODAL_PATH: "multimodal", COMPATIBLE_PATH: "openai"}

# The real gateway's body limits: 64 MiB when images travel inline as base64, 16 MiB otherwise.
_BODY_LIMIT = 64 * 1024 * 1024
_BODY_LIMIT_WITHOUT_BASE64 = 16 * 1024 * 1024
# aiohttp's own limit sits above the gateway's, so a too large body gets DashScope's 413 JSON
# answer from the simulator rather than aiohttp's plain-text one.
_CLIENT_MAX_SIZE = 70 * 1024 * 1024

# Input tokens billed per image, whatever its size. Real Qwen-VL bills by pixels (one token per
# 28x28 patch); a constant keeps the usage of a test computable by hand.
IMAGE_TOKENS = 258

# The messages below are the real service's, byte for byte (including its typo "occured", the
# fullwidth exclamation mark of the url error and the grammar of the stream-only messages):
# clients match on them.
_MSG_INVALID_KEY = "Invalid API-key provided."
_MSG_TOKEN_QUOTA = "Allocated quota exceeded, please increase your quota limit."
_MSG_RATE_QUOTA = "Requests rate limit exceeded, please try again later."
_MSG_FREE_QUOTA = "Free allocated quota exceeded."
_MSG_INTERNAL = "An internal error has occured, please try again later or contact service support."
_MSG_ALGO = "An error occurred in model serving, error message is: [Internal server error!]"
_MSG_EMPTY_MODEL = "Required parameter(s) missing or invalid, please check the request parameters."
_MSG_EMPTY_INPUT = "Required input parameter missing from request."
_MSG_MODEL_NOT_EXIST = "Model not exist."
_MSG_URL_ERROR = "url error, please check url！"
_MSG_STREAM_ONLY = (
    "This model only support stream mode, please enable the stream parameter to access the model."
)
_MSG_THINKING_STREAM_ONLY = (
    # The real wording, as users of the service report it.
    "parameter.enable_thinking must be set to false for non-streaming calls"
)
_MSG_INCREMENTAL = "The incremental_output parameter must be true when enable_thinking is true."
_MSG_JSON_WORD = (
    "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."
)
_MSG_TOO_LARGE = "Request body too large."
_MSG_OPENAI_INVALID_KEY = "Incorrect API key provided."
# Compatible mode's wording of the token-rate throttle (recorded from the real service).
_MSG_OPENAI_TOKEN_QUOTA = (
    "You exceeded your current quota, please check your plan and billing details. For details, "
    "see: https://help.aliyun.com/zh/model-studio/error-code#token-limit"
)

# Test markers: a prompt containing "[sim:NAME]" gets this error instead of a reply, so
# end-to-end tests can aim a specific failure at a specific row. Two more markers act later:
# "[sim:OutputInspection]" fails the output (after a few events of a stream), and
# "[sim:BadJson]" makes a JSON-mode reply invalid JSON (see simulated_reply).
_MARKERS: dict[str, tuple[int, str, str]] = {
    "DataInspectionFailed": (
        400,
        "DataInspectionFailed",
        "Input data may contain inappropriate content.",
    ),
    "Arrearage": (
        400,
        "Arrearage",
        "Access denied, please make sure your account is in good standing.",
    ),
    "AccessDenied": (403, "AccessDenied", "Access denied."),
    "FreeTierOnly": (
        403,
        "AllocationQuota.FreeTierOnly",
        "The free tier of the model has been exhausted. If you wish to continue access the "
        'model on a paid basis, please disable the "use free tier only" mode in the '
        "management console.",
    ),
    "FreeQuotaExceeded": (429, "Throttling.AllocationQuota", _MSG_FREE_QUOTA),
    "TooLarge": (413, "BadRequest.TooLarge", _MSG_TOO_LARGE),
    "InvalidParameter": (400, "InvalidParameter", "The parameter is invalid."),
    "InternalError": (500, "InternalError", _MSG_INTERNAL),
}
_OUTPUT_INSPECTION = (400, "DataInspectionFailed", "Output data may contain inappropriate content.")
_MARKER_RE = re.compile(r"\[sim:([A-Za-z]+)\]")
_BAD_JSON_MARKER = "[sim:BadJson]"

# How the OpenAI-compatible route words the native errors: native code -> (HTTP status or None
# for the native one, OpenAI code, OpenAI type). OpenAI mode has no HTTP 200 business errors, so
# the one the native route sends under 200 (fault_200_error) is an ordinary 500 here.
#
# | native (HTTP)                                   | OpenAI HTTP | code                         |
# |-------------------------------------------------|-------------|------------------------------|
# | InvalidApiKey (401)                             | 401         | invalid_api_key              |
# | Throttling.RateQuota (429), fault_429           | 429         | limit_requests               |
# | Throttling.AllocationQuota, token quota (429)   | 429         | insufficient_quota (#token-limit) |
# | Throttling.AllocationQuota, free quota (429)    | 429         | insufficient_quota           |
# | InvalidParameter "Model not exist." (400)       | 404         | model_not_found              |
# | InvalidParameter, BadRequest.Empty* (400)       | 400         | invalid_parameter_error      |
# | DataInspectionFailed (400)                      | 400         | data_inspection_failed       |
# | Arrearage (400)                                 | 400         | Arrearage                    |
# | AccessDenied (403)                              | 403         | access_denied                |
# | AllocationQuota.FreeTierOnly (403)              | 403         | AllocationQuota.FreeTierOnly |
# | BadRequest.TooLarge (413)                       | 413         | BadRequest.TooLarge          |
# | InternalError (500), InternalError.Algo (200)   | 500         | internal_error               |
#
# The type is "invalid_request_error" for the key, parameter, model and size errors, and the
# code itself otherwise; messages are the native ones except the key's and the model's.
_OPENAI_ERRORS: dict[str, tuple[int | None, str, str]] = {
    "InvalidApiKey": (None, "invalid_api_key", "invalid_request_error"),
    "Throttling.RateQuota": (None, "limit_requests", "limit_requests"),
    "InvalidParameter": (None, "invalid_parameter_error", "invalid_request_error"),
    "BadRequest.EmptyModel": (None, "invalid_parameter_error", "invalid_request_error"),
    "BadRequest.EmptyInput": (None, "invalid_parameter_error", "invalid_request_error"),
    "DataInspectionFailed": (None, "data_inspection_failed", "data_inspection_failed"),
    "Arrearage": (None, "Arrearage", "Arrearage"),
    "AccessDenied": (None, "access_denied", "access_denied"),
    "AllocationQuota.FreeTierOnly": (None, "AllocationQuota.FreeTierOnly", "AllocationQuota.FreeTierOnly"),
    "BadRequest.TooLarge": (None, "BadRequest.TooLarge", "invalid_request_error"),
    "InternalError": (500, "internal_error", "internal_error"),
    "InternalError.Algo": (500, "internal_error", "internal_error"),
}

_KNOWN_MODEL_RE = re.compile(
    r"qwen-(?:max|plus|turbo|flash|long|omni)"
    r"|qwen3-(?:max|coder|omni)"
    r"|qwen3\.[567]-|qwq-|qvq-|qwen-vl-|qwen3-vl-|qwen2\.5-"
    r"|qwen3-\d+(?:\.\d+)?b"
    r"|batch-test-model$"
)
# Thinking: qwq/qvq and the open-source "-thinking" snapshots always think; the open-source
# hybrid Qwen3 models (qwen3-8b, qwen3-235b-a22b, ...) think unless told not to; every other
# hybrid model (qwen-plus, qwen3-max, qwen3.5-plus, ...) thinks only when told to.
_ALWAYS_THINKS_RE = re.compile(r"qwq-|qvq-|qwen3-[\w.-]*-thinking")
_OPEN_HYBRID_RE = re.compile(r"qwen3-\d+(?:\.\d+)?b(?:-a\d+(?:\.\d+)?b)?$")
# Models that refuse non-streamed calls whatever the parameters.
_STREAM_ONLY_RE = re.compile(r"qwq-|qvq-|qwen-omni|qwen3-omni|qwen2\.5-omni|qwen3-[\w.-]*-thinking")
_ROLES = frozenset({"system", "user", "assistant", "tool"})

FaultName = Literal["fault_429", "fault_500", "fault_drop", "fault_truncate", "fault_hang", "fault_200_error"]
# Config attribute names double as outcome names; this order is the draw's order.
_FAULT_ORDER: tuple[FaultName, ...] = (
    "fault_429",
    "fault_500",
    "fault_drop",
    "fault_truncate",
    "fault_hang",
    "fault_200_error",
)


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """How the simulator behaves: its key, its speed, its quota and its faults.

    Probabilities are per request and drawn once against their cumulative sum, so they must
    add up to at most 1. ``seed`` makes the fault and latency draws repeatable; replies never
    depend on it (they are a pure function of the request).
    """

    key: str = DEMO_KEY
    latency: float = 0.0
    jitter: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    fault_429: float = 0.0
    fault_500: float = 0.0
    fault_drop: float = 0.0
    fault_truncate: float = 0.0
    fault_hang: float = 0.0
    hang_seconds: float = 600.0
    fault_200_error: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Fail at construction, where the caller can still turn it into a usage error,
        # rather than as a mysterious behaviour under load.
        if not self.key:
            raise ValueError("key must not be empty")
        for name in ("latency", "jitter", "hang_seconds"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.rpm is not None and self.rpm < 1:
            raise ValueError(f"rpm must be >= 1 or None, got {self.rpm!r}")
        if self.tpm is not None and self.tpm < 1:
            raise ValueError(f"tpm must be >= 1 or None, got {self.tpm!r}")
        total = 0.0
        for name in _FAULT_ORDER:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
            total += value
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities add up to {total:g}, more than 1")


@dataclass
class SimulatorStats:
    """What the simulator saw and answered, for tests and benchmarks to assert on.

    ``outcomes`` counts the final outcome of each request; a hang is counted as "fault_hang"
    when it starts and again under the outcome of the answer it eventually gives, so that
    ``outcomes["ok"] == len(served)`` always holds. ``served`` maps each successful reply's
    request id to its content (streamed ones too, once their last event is written), which
    lets a test check that a result file holds exactly what was served (no lost or duplicated
    paid work). ``workspaces`` counts the ``X-DashScope-WorkSpace`` header values received,
    ``routes`` the requests per route ("text", "multimodal", "openai"), and ``streamed`` the
    answers sent as an event stream: successes, cut streams, and the native errors delivered
    as an ``event:error`` (an OpenAI stream's errors are plain JSON and do not count).
    """

    requests: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    served: dict[str, str] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)
    workspaces: collections.Counter[str] = field(default_factory=collections.Counter)
    throttled: list[float] = field(default_factory=list)  # when each quota 429 was sent
    answered: list[tuple[float, int]] = field(default_factory=list)  # (when, total tokens) per ok
    streamed: int = 0
    routes: collections.Counter[str] = field(default_factory=collections.Counter)


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


# --- tokens and replies -------------------------------------------------------------------

# One token per CJK ideograph, kana or Hangul character: roughly what Qwen's BPE does, and far
# from the 1-per-4-bytes rule that holds for Latin text.
_CJK_RE = re.compile(
    "[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)


def count_tokens(text: str) -> int:
    """Estimate the tokens of ``text``, cheaply and deterministically.

    Each CJK, kana or Hangul character is one token; the remaining text costs one token per
    4 UTF-8 bytes, rounded up; non-empty text costs at least 1. It is not Qwen's tokenizer,
    but it is consistent, so the usage the simulator reports adds up exactly in tests.
    """
    if not text:
        return 0
    if text.isascii():
        return max(1, -(-len(text) // 4))
    rest = _CJK_RE.sub("", text)
    cjk = len(text) - len(rest)
    return max(1, cjk + math.ceil(len(rest.encode("utf-8")) / 4))


def _cut_to_tokens(text: str, limit: int) -> str:
    """Return the longest prefix of ``text`` that fits in ``limit`` tokens.

    count_tokens grows by at most 1 per character, so the longest fitting prefix of a text
    that does not fit costs exactly ``limit`` tokens, like a real cut at max_tokens.
    """
    lo, hi = 0, len(text)  # invariant: text[:lo] fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


# Ordinary words, so that replies read as prose in a result file or a demo.
_VOCABULARY_TEXT = """
about above across after again answer approach around balance batch better between
brief careful case change clear close common complete consider context cost course
current data detail different direct each early easy effect enough example fact field
final first focus follow form general given good great group guide help high idea
important include input large later learn level light likely limit line list local long
main make many mean method model more most move much need next note number often order
other output part people place plan point possible practical problem process question
quick rather reason record result right rule same short simple small some source
specific start state step still strong such summary system table task term test text
these thing think through time together useful usual value various view well while
whole within word work world write
"""
_VOCABULARY = tuple(_VOCABULARY_TEXT.split())


def _word_indices(seed: bytes) -> Iterator[int]:
    """An endless, deterministic stream of 16-bit numbers derived from ``seed`` by SHA-256."""
    counter = 0
    while True:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        for i in range(0, len(block), 2):
            yield int.from_bytes(block[i : i + 2], "big")
        counter += 1


def _prose(seed: bytes, min_words: int, max_words: int) -> str:
    """Deterministic plausible-looking sentences of ordinary words, ending with a period."""
    numbers = _word_indices(seed)
    count = min_words + next(numbers) % (max_words - min_words + 1)
    sentences: list[str] = []
    words: list[str] = []
    sentence_length = 5 + next(numbers) % 8
    for _ in range(count):
        words.append(_VOCABULARY[next(numbers) % len(_VOCABULARY)])
        if len(words) == sentence_length:
            sentences.append(" ".join(words).capitalize() + ".")
            words = []
            sentence_length = 5 + next(numbers) % 8
    if words:
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def _message_text(message: Any) -> str:
    """The text of a message whose content is a string or a list of parts (images count 0)."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _snippet(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- images -------------------------------------------------------------------------------

_IMAGE_FORMATS = ("png", "jpeg", "webp", "gif", "bmp", "tiff", "heic")
_DATA_URI_RE = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),(.*)", re.DOTALL | re.IGNORECASE)
_HTTP_URL_RE = re.compile(r"https?://[^\s/?#]+\S*", re.IGNORECASE)


def _data_uri_bytes(uri: str) -> bytes | None:
    """The decoded payload of a ``data:...;base64,...`` URI, or None if it is not one."""
    match = _DATA_URI_RE.fullmatch(uri)
    if match is None or ";base64" not in match[2].lower():
        return None
    try:
        return base64.b64decode(match[3], validate=True)
    except (binascii.Error, ValueError):
        return None


def image_id(uri: str) -> str:
    """The short name a reply gives an image: 8 hex digits of SHA-256.

    Of the decoded bytes for a base64 data URI (one picture, one name, whatever MIME type
    its data URI claims), of the URL string otherwise. Tests elsewhere compute it to check which
    images reached the model.
    """
    data = _data_uri_bytes(uri)
    return hashlib.sha256(uri.encode("utf-8") if data is None else data).hexdigest()[:8]


def _image_problem(value: Any) -> str | None:
    """Why the service would refuse this image value, or None if it takes it."""
    if not isinstance(value, str) or not value:
        return (
            "The image of a content part should be a non-empty string: an http(s) URL or a "
            "data:image/<format>;base64,<data> URI."
        )
    if _HTTP_URL_RE.fullmatch(value):
        return None  # never fetched: the simulator stays offline
    match = _DATA_URI_RE.fullmatch(value)
    if match is None:
        return (
            f"Invalid image {_snippet(value, 40)!r}: images must be http(s) URLs or "
            "data:image/<format>;base64,<data> URIs; the service cannot read local files or paths."
        )
    mime = match[1].lower()
    if not mime.startswith("image/") or mime.removeprefix("image/") not in _IMAGE_FORMATS:
        formats = ", ".join(f"image/{name}" for name in _IMAGE_FORMATS)
        return f"Unsupported image MIME type {match[1]!r} in a data URI; supported: {formats}."
    if ";base64" not in match[2].lower():
        return "An image data URI must be base64-encoded: data:image/<format>;base64,<data>."
    if not _data_uri_bytes(value):
        return "The base64 data of an image data URI is invalid or empty."
    return None


def _image_values(messages: list[Any]) -> list[Any]:
    """The ``image`` value of every image part, in request order."""
    return [
        part["image"]
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and "image" in part
    ]


# --- JSON replies -------------------------------------------------------------------------

_SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SCHEMA_DEPTH = 32


def _schema_problem(schema: Any, where: str, depth: int = 0) -> str | None:
    """Why ``schema`` is not a JSON schema the simulator can answer, or None.

    Only the keywords the simulator reads are checked; the others are ignored, as is the
    ``strict`` flag, and the reply is valid whatever they say only for the supported ones.
    """
    if not isinstance(schema, dict):
        return f"{where} should be an object"
    if depth > _SCHEMA_DEPTH:
        return f"{where} is nested more than {_SCHEMA_DEPTH} levels deep"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not kinds and kind is not None:
        return f"{where}.type should not be an empty list"
    for name in kinds:
        if name not in _SCHEMA_TYPES:
            return f"{where}.type {name!r} is not one of {', '.join(sorted(_SCHEMA_TYPES))}"
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            return f"{where}.properties should be an object"
        for name, sub in properties.items():
            if problem := _schema_problem(sub, f"{where}.properties.{name}", depth + 1):
                return problem
    required = schema.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(name, str) for name in required)
    ):
        return f"{where}.required should be a list of property names"
    if "items" in schema and (problem := _schema_problem(schema["items"], f"{where}.items", depth + 1)):
        return problem
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        return f"{where}.enum should be a non-empty list"
    for name in ("minItems", "maxItems", "minLength", "maxLength"):
        value = schema.get(name)
        if value is not None and not (_is_int(value) and value >= 0):
            return f"{where}.{name} should be an integer >= 0"
    for name in ("minimum", "maximum"):
        value = schema.get(name)
        if value is not None and not _is_number(value):
            return f"{where}.{name} should be a number"
    for name in ("anyOf", "oneOf"):
        options = schema.get(name)
        if options is not None:
            if not (isinstance(options, list) and options):
                return f"{where}.{name} should be a non-empty list of schemas"
            for index, sub in enumerate(options):
                if problem := _schema_problem(sub, f"{where}.{name}[{index}]", depth + 1):
                    return problem
    return None


def _schema_instance(schema: Any, seed: bytes, path: str, depth: int = 0) -> Any:
    """A deterministic JSON value valid against ``schema`` (for the keywords supported).

    Every value derives from SHA-256 of the request and its path in the document, so the same
    schema gets the same document, and two fields of the same type get different values.
    """
    numbers = _word_indices(seed + path.encode("utf-8"))
    if not isinstance(schema, dict) or depth > _SCHEMA_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[next(numbers) % len(enum)]
    if "type" not in schema:
        for name in ("anyOf", "oneOf"):
            options = schema.get(name)
            if isinstance(options, list) and options:
                return _schema_instance(options[0], seed, path, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((name for name in kind if name != "null"), "null")
    if kind not in _SCHEMA_TYPES:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"

    if kind == "object":
        properties = schema.get("properties")
        result = {
            name: _schema_instance(sub, seed, f"{path}.{name}", depth + 1)
            for name, sub in (properties.items() if isinstance(properties, dict) else ())
        }
        required = schema.get("required")
        for name in required if isinstance(required, list) else ():
            if isinstance(name, str) and name not in result:
                result[name] = _prose(seed + f"{path}.{name}".encode(), 2, 8)
        return result
    if kind == "array":
        min_items, max_items = schema.get("minItems"), schema.get("maxItems")
        least = min_items if _is_int(min_items) else 0
        most = max_items if _is_int(max_items) else None
        count = max(least, 2 if most is None else min(2, most))
        items = schema.get("items", {})
        return [_schema_instance(items, seed, f"{path}[{index}]", depth + 1) for index in range(count)]
    if kind == "string":
        text = _prose(seed + path.encode("utf-8"), 2, 8)
        shortest, longest = schema.get("minLength"), schema.get("maxLength")
        if _is_int(shortest) and len(text) < shortest:
            text = text.ljust(shortest, ".")
        if _is_int(longest):
            text = text[:longest]
        return text
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        low = low if _is_number(low) else None
        high = high if _is_number(high) else None
        if low is None:
            low = 0 if high is None or high >= 0 else high - 100
        if high is None or high < low:
            high = low + 100
        if kind == "integer":
            first, last = math.ceil(low), math.floor(high)
            return first if last < first else first + next(numbers) % (last - first + 1)
        return min(high, max(low, round(low + (high - low) * next(numbers) / 65535, 2)))
    if kind == "boolean":
        return next(numbers) % 2 == 0
    return None


def _break_json(text: str) -> str:
    """Valid JSON made invalid, the way a model that lost track does: the closing bracket missing."""
    return text[:-1] if text and text[-1] in '}]"' else text + ","


# --- replies --------------------------------------------------------------------------------


def _thinks(model: str, enable_thinking: Any) -> bool:
    if _ALWAYS_THINKS_RE.match(model):
        return True
    if _OPEN_HYBRID_RE.match(model):
        return enable_thinking is not False
    return enable_thinking is True


def only_streamed(model: str, parameters: dict) -> bool:
    """Whether the real service refuses this call unless it is streamed.

    qwq-/qvq- models, the omni models and the open-source "-thinking" snapshots answer streamed
    calls only; the open-source hybrid Qwen3 models (qwen3-8b, qwen3-235b-a22b, ...) do while they
    think, which is by default (``parameters["enable_thinking"]`` false turns it off). Commercial
    hybrids (qwen-plus, qwen3-max, qwen3.5-plus, ...) think non-streamed too. ``parameters`` is
    the native ``parameters`` object, or the OpenAI body (its extras are top-level keys).
    """
    if _STREAM_ONLY_RE.match(model):
        return True
    return bool(_OPEN_HYBRID_RE.match(model)) and _thinks(model, parameters.get("enable_thinking"))


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
    canonical = json.dumps(
        [model, [_plain(m) for m in messages]],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()

    prompt = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            prompt = _message_text(message)
            break
    else:
        if messages:
            prompt = _message_text(messages[-1])
    snippet = _snippet(prompt)
    image_ids = tuple(image_id(value) for value in _image_values(messages) if isinstance(value, str))

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

    finish_reason: Literal["stop", "length"] = "stop"
    if max_tokens is not None and count_tokens(content) > max_tokens:
        content = _cut_to_tokens(content, max_tokens)
        finish_reason = "length"

    reasoning: str | None = None
    reasoning_tokens = 0
    if _thinks(model, enable_thinking):
        reasoning = f'Let me think about "{snippet}". ' + _prose(digest + b"reasoning", 20, 80)
        if thinking_budget is not None and count_tokens(reasoning) > thinking_budget:
            reasoning = _cut_to_tokens(reasoning, thinking_budget)
        reasoning_tokens = count_tokens(reasoning)

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


# --- streaming ------------------------------------------------------------------------------

# A few words per event, and no more than a few characters of a long word (CJK text has no
# spaces), so that every ordinary reply streams in several events.
_STREAM_WORDS = 4
_STREAM_CHARS = 16


def _stream_deltas(text: str) -> list[str]:
    """``text`` split into the deltas of a stream; they join up to exactly ``text``."""
    words = re.findall(r"\s*\S+\s*", text) or ([text] if text else [])
    pieces = [word[i : i + _STREAM_CHARS] for word in words for i in range(0, len(word), _STREAM_CHARS)]
    return ["".join(pieces[i : i + _STREAM_WORDS]) for i in range(0, len(pieces), _STREAM_WORDS)]


@dataclass(frozen=True)
class _Piece:
    """One event's worth of a streamed reply, with the usage billed up to it."""

    reasoning: str  # this event's reasoning delta ("" once the answer has started)
    content: str  # this event's answer delta ("" while reasoning)
    content_so_far: str
    output_tokens: int
    reasoning_tokens: int


def _stream_pieces(reply: SimReply) -> list[_Piece]:
    """Reasoning deltas first, then answer deltas, each with its cumulative usage.

    The last piece's usage is the reply's own (count_tokens of the whole texts), so a client
    that keeps the last usage of a stream bills exactly what a non-streamed call would.
    """
    pieces: list[_Piece] = []
    reasoning_so_far = ""
    for delta in _stream_deltas(reply.reasoning or ""):
        reasoning_so_far += delta
        tokens = count_tokens(reasoning_so_far)
        pieces.append(_Piece(delta, "", "", tokens, tokens))
    content_so_far = ""
    for delta in _stream_deltas(reply.content):
        content_so_far += delta
        output_tokens = reply.reasoning_tokens + count_tokens(content_so_far)
        pieces.append(_Piece("", delta, content_so_far, output_tokens, reply.reasoning_tokens))
    return pieces


# --- quota --------------------------------------------------------------------------------


class TokenBucket:
    """DashScope's requests-per-minute quota, which it enforces per second as RPM/60.

    Capacity is max(1, rpm/60) and the bucket starts full, so a burst larger than one second's
    share is throttled even well under the minute's quota: exactly what catches a client that
    paces per minute instead of per second. The clock is passed in, so the bucket can be
    tested without sleeping.
    """

    def __init__(self, rpm: int, now: float) -> None:
        self.rate = rpm / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.updated = now

    def try_take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` if there is that much; a refused request takes nothing.

        For the token quota a request may need more than a second's worth: it is let through
        when the bucket is full (the request is alone in its second) and leaves it in debt.
        """
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= amount or (amount > self.capacity and self.tokens >= self.capacity):
            self.tokens -= amount
            return True
        return False


# --- the server ---------------------------------------------------------------------------


class _ApiError(Exception):
    """An error answer, raised from deep inside validation to keep the handler linear.

    ``openai`` overrides how the OpenAI route words it, as (status, code, type, message), for
    the errors whose wording differs beyond the ``_OPENAI_ERRORS`` table.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        outcome: str,
        *,
        openai: tuple[int, str, str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.outcome = outcome
        self.openai = openai


def _bad_request(message: str, code: str = "InvalidParameter") -> _ApiError:
    return _ApiError(400, code, message, "bad_request_400")


def _too_large() -> _ApiError:
    return _ApiError(413, "BadRequest.TooLarge", _MSG_TOO_LARGE, "error:BadRequest.TooLarge")


def _dumps(payload: dict[str, Any]) -> bytes:
    # DashScope sends UTF-8 text unescaped; so do we.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error_payload(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": request_id}


def _openai_error(error: _ApiError, request_id: str) -> tuple[int, dict[str, Any]]:
    """The OpenAI-compatible route's (status, body) for a native error: see ``_OPENAI_ERRORS``."""
    if error.openai is not None:
        status, code, kind, message = error.openai
    elif error.code == "InvalidApiKey":
        status, code, kind, message = 401, "invalid_api_key", "invalid_request_error", _MSG_OPENAI_INVALID_KEY
    elif error.message == _MSG_FREE_QUOTA:
        status, code, kind, message = 429, "insufficient_quota", "insufficient_quota", _MSG_FREE_QUOTA
    elif error.code == "Throttling.AllocationQuota":
        status, code, kind, message = 429, "insufficient_quota", "insufficient_quota", _MSG_OPENAI_TOKEN_QUOTA
    else:
        fixed_status, code, kind = _OPENAI_ERRORS.get(error.code, (500, "internal_error", "internal_error"))
        status, message = fixed_status or error.status, error.message
    error_object = {"message": message, "type": kind, "param": None, "code": code}
    return status, {"error": error_object, "request_id": request_id}


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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


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


def _is_multimodal_model(model: str) -> bool:
    # qwen3.5+ families are served only by the multimodal route, even for text-only input.
    return (
        model.startswith(("qwen3.5-", "qwen3.6-", "qwen3.7-", "qvq-")) or "-vl" in model or ("omni" in model)
    )


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


class Simulator:
    """The DashScope simulator as an aiohttp server on the caller's event loop."""

    def __init__(self, config: SimulatorConfig = SimulatorConfig()) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self._rng = random.Random(config.seed)
        self._auth = f"Bearer {config.key}"
        self._bucket: TokenBucket | None = None
        self._token_bucket: TokenBucket | None = None
        self._fault_thresholds: list[tuple[float, FaultName]] = []
        cumulative = 0.0
        for name in _FAULT_ORDER:
            probability = getattr(config, name)
            if probability > 0:
                cumulative += probability
                self._fault_thresholds.append((cumulative, name))
        self._runner: web.AppRunner | None = None
        self._sleepers: set[asyncio.Task[Any]] = set()
        self._stopping = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the native API base URL.

        The OpenAI-compatible base URL is the same origin with ``/compatible-mode/v1``.
        """
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Per-request access logs would cost more than the simulated work at benchmark rates.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._stopping = False
        if self.config.rpm is not None:
            self._bucket = TokenBucket(self.config.rpm, time.monotonic())
        if self.config.tpm is not None:
            self._token_bucket = TokenBucket(self.config.tpm, time.monotonic())
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        return f"http://{url_host}:{bound_port}/api/v1"

    async def stop(self) -> None:
        """Stop serving; requests that hang or sleep are cancelled, not waited for.

        A hang fault lasts ten minutes by default: a test tearing down must not inherit it.
        """
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        for task in list(self._sleepers):
            task.cancel()
        await runner.cleanup()

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            raise asyncio.CancelledError
        task = asyncio.current_task()
        assert task is not None
        self._sleepers.add(task)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._sleepers.discard(task)

    def _draw_fault(self) -> FaultName | None:
        if not self._fault_thresholds:
            return None
        draw = self._rng.random()
        for threshold, name in self._fault_thresholds:
            if draw < threshold:
                return name
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request, checking in the gateway's order: key, quota, then the body.

        The order is observable (a throttled request with a bad body gets 429, not 400), and a
        client's error handling is only tested if it meets the errors in the real order.
        """
        request_id = str(uuid.uuid4())
        route = _ROUTES.get(request.path) if request.method == "POST" else None
        if route is None:
            payload = _error_payload("NotFound", "Not Found", request_id)
            return _json_response(404, payload, request_id)

        stats = self.stats
        now = time.monotonic()
        stats.requests += 1
        stats.arrivals.append(now)
        stats.routes[route] += 1
        workspace = request.headers.get("X-DashScope-WorkSpace")
        if workspace is not None:
            stats.workspaces[workspace] += 1
        # A native stream is asked for in a header, so even the gateway's own refusals come as
        # events; an OpenAI stream is asked for in the body, and its refusals are plain JSON.
        sse = route != "openai" and request.headers.get("X-DashScope-SSE", "").strip().lower() == "enable"

        def refuse(status: int, code: str, message: str, outcome: str) -> _Answer:
            return _error_answer(route, sse, _ApiError(status, code, message, outcome), request_id)

        if request.headers.get("Authorization") != self._auth:
            answer = refuse(401, "InvalidApiKey", _MSG_INVALID_KEY, "auth_401")
            return await self._send(request, answer, request_id)
        if self._bucket is not None and not self._bucket.try_take(now):
            answer = refuse(429, "Throttling.RateQuota", _MSG_RATE_QUOTA, "quota_429")
            return await self._send(request, answer, request_id)

        fault = self._draw_fault()
        if fault is not None:
            if fault == "fault_429":
                answer = refuse(429, "Throttling.RateQuota", _MSG_RATE_QUOTA, fault)
                return await self._send(request, answer, request_id)
            if fault == "fault_500":
                answer = refuse(500, "InternalError", _MSG_INTERNAL, fault)
                return await self._send(request, answer, request_id)
            if fault == "fault_200_error":
                # A non-streamed call gets the business error under HTTP 200; a stream has no
                # such thing (its errors are all under 200), so its event says the 500 it is.
                status = 500 if sse or route == "openai" else 200
                answer = refuse(status, "InternalError.Algo", _MSG_ALGO, fault)
                return await self._send(request, answer, request_id)
            if fault == "fault_drop":
                stats.outcomes[fault] += 1
                return self._drop(request)
            if fault == "fault_hang":
                stats.outcomes[fault] += 1
                await self._sleep(self.config.hang_seconds)

        try:
            call = await self._prepare(request, route, sse)
        except _ApiError as error:
            answer = _error_answer(route, sse, error, request_id)
        else:
            answer = _success_answer(call, request_id)
        return await self._send(request, answer, request_id, truncate=fault == "fault_truncate")

    async def _send(
        self, request: web.Request, answer: _Answer, request_id: str, *, truncate: bool = False
    ) -> web.StreamResponse:
        """Send ``answer`` (cut short if ``truncate``) and count it."""
        stats = self.stats
        if truncate:
            stats.outcomes["fault_truncate"] += 1
        else:
            stats.outcomes[answer.outcome] += 1
            if answer.outcome.startswith("quota"):
                stats.throttled.append(time.monotonic())
        delivered = not truncate
        served: list[tuple[float, int]] = []

        def serve() -> None:
            if answer.content is not None:
                stats.served[request_id] = answer.content
                served.append((time.monotonic(), answer.total_tokens))
                stats.answered.append(served[0])

        if answer.events is not None:
            stats.streamed += 1
            response, delivered = await self._send_events(
                request, answer.events, request_id, cut=truncate, before_last=serve
            )
            if not delivered and served:
                # The client left before the last event: not served after all (a retry will
                # be), and a test comparing a result file with ``served`` must not find it.
                stats.served.pop(request_id, None)
                stats.answered.remove(served[0])
            return response
        elif truncate:
            assert answer.payload is not None
            response = await self._send_truncated(request, answer.status, _dumps(answer.payload), request_id)
        else:
            assert answer.payload is not None
            response = _json_response(answer.status, answer.payload, request_id)
        if delivered:
            serve()
        return response

    async def _prepare(self, request: web.Request, route: str, sse: bool) -> _Call:
        """Read, validate and answer the body, in the protocol's order (checks 5 to 9)."""
        raw = await self._read_body(request)
        try:
            body = json.loads(raw)
        except ValueError:  # includes UnicodeDecodeError
            raise _bad_request("The request body is not valid JSON.") from None

        if route == "openai":
            model, messages, parameters, stream, include_usage = _validate_openai(body)
            if not _KNOWN_MODEL_RE.match(model):
                missing = f"The model `{model}` does not exist or you do not have access to it."
                openai = (404, "model_not_found", "invalid_request_error", missing)
                raise _ApiError(
                    400, "InvalidParameter", _MSG_MODEL_NOT_EXIST, "bad_request_400", openai=openai
                )
        else:
            model, messages, parameters = _validate(body)
            stream, include_usage = sse, False
            if not _KNOWN_MODEL_RE.match(model):
                raise _bad_request(_MSG_MODEL_NOT_EXIST)
            multimodal = route == "multimodal"
            if multimodal != _is_multimodal_model(model):
                raise _bad_request(_MSG_URL_ERROR)
            if multimodal and not all(isinstance(m.get("content"), list) for m in messages):
                raise _bad_request(
                    'Content of every message should be a list of parts, e.g. [{"text": "..."}].'
                )

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
        response_format = _check_response_format(parameters.get("response_format"), messages)

        if not stream and only_streamed(model, parameters):
            always = _STREAM_ONLY_RE.match(model)
            raise _bad_request(_MSG_STREAM_ONLY if always else _MSG_THINKING_STREAM_ONLY)
        thinking = _thinks(model, parameters.get("enable_thinking"))
        if stream and route != "openai" and thinking and parameters.get("incremental_output") is not True:
            raise _bad_request(_MSG_INCREMENTAL)

        output_inspection = False
        for message in messages:
            text = _message_text(message)
            if "[sim:" in text:
                for name in _MARKER_RE.findall(text):
                    if name in _MARKERS:
                        status, code, error_message = _MARKERS[name]
                        raise _ApiError(status, code, error_message, f"error:{code}")
                    output_inspection = output_inspection or name == "OutputInspection"

        reply = simulated_reply(
            model,
            messages,
            max_tokens=parameters.get("max_tokens"),
            enable_thinking=parameters.get("enable_thinking"),
            thinking_budget=parameters.get("thinking_budget"),
            response_format=response_format,
        )
        if self._token_bucket is not None and not self._token_bucket.try_take(
            time.monotonic(), reply.total_tokens
        ):
            raise _ApiError(429, "Throttling.AllocationQuota", _MSG_TOKEN_QUOTA, "quota_tpm_429")

        config = self.config
        if config.latency > 0 or config.jitter > 0:
            delay = config.latency + self._rng.uniform(-config.jitter, config.jitter)
            if delay > 0:
                await self._sleep(delay)

        return _Call(route, model, parameters, reply, stream, include_usage, output_inspection)

    @staticmethod
    async def _read_body(request: web.Request) -> bytes:
        """The body, or 413 past the gateway's limits: 64 MiB, or 16 MiB without base64 images."""
        if request.content_length is not None and request.content_length > _BODY_LIMIT:
            raise _too_large()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large() from None
        if len(raw) > _BODY_LIMIT or (len(raw) > _BODY_LIMIT_WITHOUT_BASE64 and b";base64," not in raw):
            raise _too_large()
        return raw

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        # Closing the transport before aiohttp writes anything makes its write fail with a
        # ConnectionError, which it treats as a client disconnect: nothing is sent, no log.
        if request.transport is not None:
            request.transport.close()
        response = web.Response()
        response.force_close()
        return response

    @staticmethod
    async def _send_truncated(
        request: web.Request, status: int, body: bytes, request_id: str
    ) -> web.StreamResponse:
        # The honest Content-Length followed by half the body is what a proxy cut mid-transfer
        # looks like: the client must notice the short read instead of parsing half a JSON.
        response = web.StreamResponse(status=status, headers={"x-request-id": request_id})
        response.content_type = "application/json"
        response.content_length = len(body)
        response.force_close()
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()  # flushes what was written, then closes
        return response

    @staticmethod
    async def _send_events(
        request: web.Request,
        events: list[bytes],
        request_id: str,
        *,
        cut: bool,
        before_last: Callable[[], None] = lambda: None,
    ) -> tuple[web.StreamResponse, bool]:
        """Stream ``events`` in chunked encoding, one chunk each; say whether all were written.

        ``cut`` sends about half of them (half the bytes of a lone event) and closes the
        connection without the final empty chunk: a stream that died mid-way, which a client
        must not mistake for a complete one. ``before_last`` runs just before the last event is
        written: a client may act on that event before this coroutine resumes.
        """
        response = web.StreamResponse(
            status=200, headers={"x-request-id": request_id, "Content-Type": _SSE_CONTENT_TYPE}
        )
        response.enable_chunked_encoding()
        if cut:
            response.force_close()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client went away: nothing to do
            if cut:
                if len(events) > 1:
                    for event in events[: len(events) // 2]:
                        await response.write(event)
                else:
                    await response.write(events[0][: len(events[0]) // 2])
                if request.transport is not None:
                    request.transport.close()  # flushes what was written, then closes
                return response, False
            for event in events[:-1]:
                await response.write(event)
            before_last()
            await response.write(events[-1])
            await response.write_eof()
            return response, True
        return response, False


class SimulatorThread:
    """Runs a Simulator on its own event loop in a daemon thread.

    For sync callers (tests, ``batchgen run --simulate``) that cannot share their thread with
    an event loop. ``stats`` is the live object the server thread updates.
    """

    def __init__(
        self,
        config: SimulatorConfig = SimulatorConfig(),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.base_url = ""
        self._simulator = Simulator(config)
        self.stats = self._simulator.stats
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def compatible_base_url(self) -> str:
        """The OpenAI-compatible base URL (``.../compatible-mode/v1``), once started."""
        return self.base_url.removesuffix("/api/v1") + "/compatible-mode/v1" if self.base_url else ""

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> str:
        """Start the server thread and return the base URL once it is listening."""
        if self._thread is not None:
            raise RuntimeError("simulator thread already started")
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="batchgen-simulator", daemon=True
        )
        self._thread.start()
        try:
            self.base_url = ready.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        return self.base_url

    def stop(self) -> None:
        """Stop the server (cancelling hanging requests) and join its thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        thread.join()

    def _run(self, ready: concurrent.futures.Future[str]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            try:
                url = await self._simulator.start(self.host, self.port)
            except BaseException as error:
                ready.set_exception(error)
                return
            ready.set_result(url)
            try:
                await self._stop_event.wait()
            finally:
                await self._simulator.stop()

        # asyncio.run also cancels leftovers and closes the loop, so nothing leaks a warning.
        asyncio.run(main())


def serve_forever(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until Ctrl-C or SIGTERM, for the README demo and manual experiments."""

    async def main() -> None:
        simulator = Simulator(config)
        base_url = await simulator.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Not available on Windows or off the main thread: Ctrl-C then arrives as
            # KeyboardInterrupt, handled below.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
        # Only the simulator's own demo key is echoed: a key someone chose stays off the screen.
        shown_key = config.key if config.key == DEMO_KEY else "<the key you configured>"
        print(
            f"DashScope simulator listening on {base_url} (key {shown_key}); point batchgen "
            f"at it with DASHSCOPE_HTTP_BASE_URL={base_url} DASHSCOPE_API_KEY={shown_key}. "
            "Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await simulator.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
