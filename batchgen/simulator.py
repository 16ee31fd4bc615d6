"""A local DashScope server that speaks the native chat protocol over real HTTP.

The end-to-end tests, the README demo and the benchmarks need a DashScope that is free,
offline, fast and misbehaves on demand. A transport-level fake would only test what its author
believed about the protocol; a real server on loopback makes the client go through its actual
connection pool, timeouts, retries and JSON parsing. So this module answers exactly what the
real service answers (routes, JSON shapes, error codes and messages, the ``x-request-id``
header), and adds, on top, what the real service does only on a bad day: throttling, 5xx,
dropped connections, truncated bodies, hangs and HTTP 200 business errors.

Replies are a pure function of the request (:func:`simulated_reply`), so a test can compute the
answer it expects, and a resumed run must reproduce byte-identical results. Only the fault and
latency draws are random, from their own seeded RNG.

Usage from async code::

    sim = Simulator(SimulatorConfig(fault_500=0.1))
    base_url = await sim.start()
    ...
    await sim.stop()

and from sync code (tests, ``batchgen run --simulate``)::

    with SimulatorThread(SimulatorConfig(rpm=600)) as sim:
        run_things_against(sim.base_url)
"""

from __future__ import annotations

import asyncio
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
from typing import Any, Literal

from aiohttp import web

__all__ = [
    "DEMO_KEY",
    "MULTIMODAL_PATH",
    "TEXT_PATH",
    "SimReply",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "SimulatorThread",
    "TokenBucket",
    "count_tokens",
    "serve_forever",
    "simulated_reply",
]

DEMO_KEY = "sk-simulator-demo-key"

TEXT_PATH = "/api/v1/services/aigc/text-generation/generation"
MULTIMODAL_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
_ROUTES = {TEXT_PATH: "text", MULTIMODAL_PATH: "multimodal"}

# The real gateway accepts 64 MiB with base64 images; a little headroom so the simulator never
# rejects a body the real service would take.
_CLIENT_MAX_SIZE = 70 * 1024 * 1024

# The messages below are the real service's, byte for byte (including its typo "occured" and
# the fullwidth exclamation mark of the url error): clients match on them.
_MSG_INVALID_KEY = "Invalid API-key provided."
_MSG_TOKEN_QUOTA = "Allocated quota exceeded, please increase your quota limit."
_MSG_RATE_QUOTA = "Requests rate limit exceeded, please try again later."
_MSG_INTERNAL = "An internal error has occured, please try again later or contact service support."
_MSG_ALGO = "An error occurred in model serving, error message is: [Internal server error!]"
_MSG_EMPTY_MODEL = "Required parameter(s) missing or invalid, please check the request parameters."
_MSG_EMPTY_INPUT = "Required input parameter missing from request."
_MSG_MODEL_NOT_EXIST = "Model not exist."
_MSG_URL_ERROR = "url error, please check url！"

# Test markers: a prompt containing "[sim:NAME]" gets this error instead of a reply, so
# end-to-end tests can aim a specific failure at a specific row.
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
    "FreeQuotaExceeded": (429, "Throttling.AllocationQuota", "Free allocated quota exceeded."),
    "TooLarge": (413, "BadRequest.TooLarge", "Request body too large."),
    "InvalidParameter": (400, "InvalidParameter", "The parameter is invalid."),
    "InternalError": (500, "InternalError", _MSG_INTERNAL),
}
_MARKER_RE = re.compile(r"\[sim:([A-Za-z]+)\]")

_KNOWN_MODEL_RE = re.compile(
    r"qwen-(?:max|plus|turbo|flash|long|omni)"
    r"|qwen3-(?:max|coder|omni)"
    r"|qwen3\.[567]-|qwq-|qwen-vl-|qwen3-vl-|qwen2\.5-"
    r"|qwen3-\d+b"
    r"|batch-test-model$"
)
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
    request id to its content, which lets a test check that a result file holds exactly what
    was served (no lost or duplicated paid work). ``workspaces`` counts the
    ``X-DashScope-WorkSpace`` header values received.
    """

    requests: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    served: dict[str, str] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)
    workspaces: collections.Counter[str] = field(default_factory=collections.Counter)
    throttled: list[float] = field(default_factory=list)  # when each quota 429 was sent
    answered: list[tuple[float, int]] = field(default_factory=list)  # (when, total tokens) per ok


@dataclass(frozen=True)
class SimReply:
    """A simulated model answer with the usage the service would bill for it."""

    content: str
    reasoning: str | None
    finish_reason: Literal["stop", "length"]
    input_tokens: int
    output_tokens: int  # includes reasoning_tokens, as DashScope bills them
    reasoning_tokens: int

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


def simulated_reply(
    model: str,
    messages: list[dict],
    *,
    max_tokens: int | None = None,
    enable_thinking: bool = False,
    thinking_budget: int | None = None,
) -> SimReply:
    """The answer the simulator gives to a request: a pure function of its arguments.

    Tests compute the expected answer with this very function, and a rerun must reproduce
    identical output, so everything derives from a SHA-256 of the request (never ``hash()``,
    which changes per process). The reply quotes the last user message so a reader of a result
    file can see which prompt it answers. ``max_tokens`` cuts the answer (finish_reason
    "length"), like the real service. Thinking (``enable_thinking``, or any ``qwq-`` model,
    which always thinks) adds reasoning whose tokens are capped by ``thinking_budget`` and
    billed within ``output_tokens``.
    """
    canonical = json.dumps(
        [model, messages], sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
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

    content = f'Qwen (simulated) on "{snippet}": ' + _prose(digest + b"answer", 8, 60)
    finish_reason: Literal["stop", "length"] = "stop"
    if max_tokens is not None and count_tokens(content) > max_tokens:
        content = _cut_to_tokens(content, max_tokens)
        finish_reason = "length"

    reasoning: str | None = None
    reasoning_tokens = 0
    if enable_thinking or model.startswith("qwq-"):
        reasoning = f'Let me think about "{snippet}". ' + _prose(digest + b"reasoning", 20, 80)
        if thinking_budget is not None and count_tokens(reasoning) > thinking_budget:
            reasoning = _cut_to_tokens(reasoning, thinking_budget)
        reasoning_tokens = count_tokens(reasoning)

    input_tokens = sum(count_tokens(_message_text(m)) + 4 for m in messages) + 3
    return SimReply(
        content=content,
        reasoning=reasoning,
        finish_reason=finish_reason,
        input_tokens=max(1, input_tokens),
        output_tokens=count_tokens(content) + reasoning_tokens,
        reasoning_tokens=reasoning_tokens,
    )


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
    """An error answer, raised from deep inside validation to keep the handler linear."""

    def __init__(self, status: int, code: str, message: str, outcome: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.outcome = outcome


def _bad_request(message: str, code: str = "InvalidParameter") -> _ApiError:
    return _ApiError(400, code, message, "bad_request_400")


def _dumps(payload: dict[str, Any]) -> bytes:
    # DashScope sends UTF-8 text unescaped; so do we.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error_payload(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": request_id}


def _json_response(status: int, payload: dict[str, Any], request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=_dumps(payload),
        content_type="application/json",
        headers={"x-request-id": request_id},
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
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
        "stop",
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "Parameter stop should be a string or a list of strings",
    ),
)


def _validate(body: Any) -> tuple[str, list[dict], dict[str, Any]]:
    """Check a request body as DashScope does; return (model, messages, parameters)."""
    if not isinstance(body, dict):
        raise _bad_request("The request body should be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad_request(_MSG_EMPTY_MODEL, "BadRequest.EmptyModel")
    input_ = body.get("input")
    messages = input_.get("messages") if isinstance(input_, dict) else None
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
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise _bad_request("The parameters should be a JSON object.")
    for name, is_valid, message in _PARAMETER_RULES:
        value = parameters.get(name)
        if value is not None and not is_valid(value):
            raise _bad_request(message)
    return model, messages, parameters


def _is_multimodal_model(model: str) -> bool:
    # qwen3.5+ families are served only by the multimodal route, even for text-only input.
    return model.startswith(("qwen3.5-", "qwen3.6-", "qwen3.7-")) or "-vl" in model or ("omni" in model)


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
        """Listen on ``host:port`` (0 picks a free port) and return the API base URL."""
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

    def _error(self, status: int, code: str, message: str, outcome: str, rid: str) -> web.Response:
        self.stats.outcomes[outcome] += 1
        if outcome.startswith("quota"):
            self.stats.throttled.append(time.monotonic())
        return _json_response(status, _error_payload(code, message, rid), rid)

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
        workspace = request.headers.get("X-DashScope-WorkSpace")
        if workspace is not None:
            stats.workspaces[workspace] += 1

        if request.headers.get("Authorization") != self._auth:
            return self._error(401, "InvalidApiKey", _MSG_INVALID_KEY, "auth_401", request_id)
        if self._bucket is not None and not self._bucket.try_take(now):
            return self._error(429, "Throttling.RateQuota", _MSG_RATE_QUOTA, "quota_429", request_id)

        fault = self._draw_fault()
        if fault is not None:
            if fault == "fault_429":
                return self._error(429, "Throttling.RateQuota", _MSG_RATE_QUOTA, fault, request_id)
            if fault == "fault_500":
                return self._error(500, "InternalError", _MSG_INTERNAL, fault, request_id)
            if fault == "fault_200_error":
                return self._error(200, "InternalError.Algo", _MSG_ALGO, fault, request_id)
            if fault == "fault_drop":
                stats.outcomes[fault] += 1
                return self._drop(request)
            if fault == "fault_hang":
                stats.outcomes[fault] += 1
                await self._sleep(self.config.hang_seconds)

        status, payload, outcome, content = await self._answer(request, route, request_id)
        if fault == "fault_truncate":
            stats.outcomes[fault] += 1
            return await self._send_truncated(request, status, _dumps(payload), request_id)
        stats.outcomes[outcome] += 1
        if outcome.startswith("quota"):
            stats.throttled.append(time.monotonic())
        if content is not None:
            stats.served[request_id] = content
            stats.answered.append((time.monotonic(), payload["usage"]["total_tokens"]))
        return _json_response(status, payload, request_id)

    async def _answer(
        self, request: web.Request, route: str, request_id: str
    ) -> tuple[int, dict[str, Any], str, str | None]:
        """Validate and answer one request: (status, payload, outcome, served content)."""
        try:
            reply, multimodal, text_format = await self._generate(request, route)
        except _ApiError as error:
            payload = _error_payload(error.code, error.message, request_id)
            return error.status, payload, error.outcome, None

        message: dict[str, Any] = {"role": "assistant"}
        message["content"] = [{"text": reply.content}] if multimodal else reply.content
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        usage: dict[str, Any] = {
            "input_tokens": reply.input_tokens,
            "output_tokens": reply.output_tokens,
            "total_tokens": reply.total_tokens,
        }
        if reply.reasoning is not None:
            usage["output_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
        if multimodal:
            usage["input_tokens_details"] = {"text_tokens": reply.input_tokens}
        if text_format:
            output: dict[str, Any] = {"text": reply.content, "finish_reason": reply.finish_reason}
        else:
            output = {"choices": [{"finish_reason": reply.finish_reason, "message": message}]}
        payload = {"output": output, "usage": usage, "request_id": request_id}
        return 200, payload, "ok", reply.content

    async def _generate(self, request: web.Request, route: str) -> tuple[SimReply, bool, bool]:
        """Run checks 5 to 9 of the protocol; return (reply, multimodal, text result format)."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            marker = _MARKERS["TooLarge"]
            raise _ApiError(*marker, f"error:{marker[1]}") from None
        try:
            body = json.loads(raw)
        except ValueError:  # includes UnicodeDecodeError
            raise _bad_request("The request body is not valid JSON.") from None
        model, messages, parameters = _validate(body)

        if not _KNOWN_MODEL_RE.match(model):
            raise _bad_request(_MSG_MODEL_NOT_EXIST)
        multimodal = route == "multimodal"
        if multimodal != _is_multimodal_model(model):
            raise _bad_request(_MSG_URL_ERROR)
        if multimodal and not all(isinstance(m.get("content"), list) for m in messages):
            raise _bad_request('Content of every message should be a list of parts, e.g. [{"text": "..."}].')

        for message in messages:
            text = _message_text(message)
            if "[sim:" in text:
                for name in _MARKER_RE.findall(text):
                    if name in _MARKERS:
                        status, code, error_message = _MARKERS[name]
                        raise _ApiError(status, code, error_message, f"error:{code}")

        reply = simulated_reply(
            model,
            messages,
            max_tokens=parameters.get("max_tokens"),
            enable_thinking=bool(parameters.get("enable_thinking")),
            thinking_budget=parameters.get("thinking_budget"),
        )
        if self._token_bucket is not None and not self._token_bucket.try_take(
                time.monotonic(), reply.total_tokens):
            raise _ApiError(429, "Throttling.AllocationQuota", _MSG_TOKEN_QUOTA, "quota_tpm_429")

        config = self.config
        if config.latency > 0 or config.jitter > 0:
            delay = config.latency + self._rng.uniform(-config.jitter, config.jitter)
            if delay > 0:
                await self._sleep(delay)

        text_format = not multimodal and parameters.get("result_format") == "text"
        return reply, multimodal, text_format

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
