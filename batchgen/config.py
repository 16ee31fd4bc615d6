"""A run's settings as one frozen value, built once at the edge and passed down.

Precedence is flags, then environment (the dashscope SDK's own variables), then defaults.
Everything a request will carry is validated here, before the first byte is sent.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from batchgen.api.dialect import DIALECTS, Dialect
from batchgen.api.models import route_for_model, stream_by_default
from batchgen.api.types import Api, Route
from batchgen.errors import UsageError
from batchgen.ratestore import check_store_url, default_rate_key

COMPATIBLE_PREFIX = "/compatible-mode/v1"  # the OpenAI-compatible API on the same hosts
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

ENV_API_KEY = "DASHSCOPE_API_KEY"
ENV_BASE_URL = "DASHSCOPE_HTTP_BASE_URL"
ENV_REGION = "DASHSCOPE_API_REGION"
ENV_WORKSPACE = "DASHSCOPE_WORKSPACE_ID"
ENV_OPENAI_KEY = "OPENAI_API_KEY"  # --api openai only, after DASHSCOPE_API_KEY
ENV_OPENAI_BASE_URL = "OPENAI_BASE_URL"  # --api openai only, before DASHSCOPE_HTTP_BASE_URL

DEFAULT_MODEL = "qwen-plus"
DEFAULT_CONCURRENCY = 16
# More in flight than this buys nothing: at DashScope's largest quotas (15,000 RPM, replies of
# a few seconds) a few hundred requests are in flight; each worker costs memory and CPU.
MAX_CONCURRENCY = 2000
DEFAULT_RPM = 600.0  # the documented default quota of qwen-plus
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_TIMEOUT = 300.0

NO_KEY = (
    f"no API key: set {ENV_API_KEY} (a DashScope key from the Model Studio console), "
    "or pass --simulate to try batchgen against its built-in simulator"
)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How to call DashScope for one run. ``api_key`` never appears in ``repr``."""

    api_key: str = field(repr=False)
    base_url: str = REGION_BASE_URLS["intl"]
    model: str = DEFAULT_MODEL
    # The wire format (``api.dialect``): DashScope's native API, or "openai" for POST
    # {base_url}/chat/completions with OpenAI's shapes, whoever serves it.
    api: Api = "dashscope"
    route: Route | None = None  # None: chosen from the model name (native API only)
    stream: bool | None = None  # None: streamed only where the model or mode requires it
    json_schema: Mapping[str, Any] | None = field(default=None, repr=False)  # checks replies
    # The vendor, whatever the wire format: the server is DashScope (or its simulator), so its
    # body limits and JSON-mode rule apply and its key and workspace may be sent.
    dashscope: bool = True
    workspace: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    concurrency: int = DEFAULT_CONCURRENCY
    rpm: float = DEFAULT_RPM
    tpm: float | None = None  # tokens per minute (input + output); None: not paced on tokens
    adaptive: bool = True  # ramp up at start, slow down on throttling 429s
    # A Redis URL holding the account's budget, shared with other runs; None: this run's own.
    rate_store: str | None = field(default=None, repr=False)
    rate_key: str | None = None  # the budget's name in the store; None: default_rate_key(...)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not self.api_key or not self.api_key.strip():
            raise UsageError(NO_KEY)
        if not all(33 <= ord(c) < 127 for c in self.api_key.strip()):
            # A pasted curly quote or newline; never echo the key itself.
            raise UsageError(
                f"{ENV_API_KEY} holds characters no API key has (spaces, quotes "
                "from a word processor, non-ASCII, control characters): copy it "
                "again from the Model Studio console"
            )
        if not self.model:
            raise UsageError("the model name is empty: pass -m/--model, e.g. -m qwen-plus")
        if self.concurrency < 1:
            raise UsageError(f"--concurrency must be at least 1, got {self.concurrency}")
        if not (self.rpm > 0 and math.isfinite(self.rpm)):
            raise UsageError(f"--rpm must be a positive number, got {self.rpm}")
        if self.tpm is not None and not (self.tpm > 0 and math.isfinite(self.tpm)):
            raise UsageError(f"--tpm must be a positive number, got {self.tpm}")
        if self.max_attempts < 1:
            raise UsageError(f"--max-attempts must be at least 1, got {self.max_attempts}")
        if not self.timeout > 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.api not in ("dashscope", "openai"):
            raise UsageError(f"--api must be dashscope or openai, got {self.api!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise UsageError(f"base URL {self.base_url!r} must start with http:// or https://")
        if self.rate_store is not None:
            check_store_url(self.rate_store)
        if self.rate_key is not None and not self.rate_key.strip():
            raise UsageError("--rate-key is empty: give the budget a name, e.g. --rate-key team-a:qwen-plus")
        object.__setattr__(self, "api_key", self.api_key.strip())
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        object.__setattr__(self, "parameters", validate_parameters(self.parameters))

    @property
    def effective_rate_key(self) -> str:
        """The shared budget's name: ``rate_key``, or one per service, account and model."""
        if self.rate_key:
            return self.rate_key
        return default_rate_key(self.base_url, self.workspace, self.api_key, self.model)

    @cached_property
    def effective_route(self) -> Route:
        return self.route or route_for_model(self.model)  # asked for every row: computed once

    @property
    def effective_stream(self) -> bool:
        """``--stream`` / ``--no-stream`` if given, else streamed where needed or thinking."""
        return self.stream if self.stream is not None else stream_by_default(self.model, self.parameters)

    @property
    def dialect(self) -> Dialect:
        return DIALECTS[self.api]

    @property
    def url(self) -> str:
        """Where every request of the run goes."""
        return self.base_url + self.dialect.path(self.effective_route)


def dashscope_endpoint(base_url: str | None, api: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether requests go to DashScope, so that DashScope's key and workspace may go along.

    The native API is DashScope's by definition; with ``--api openai`` a URL counts when its
    host is Alibaba Cloud's, or when it came from DashScope's own settings
    (``DASHSCOPE_HTTP_BASE_URL``, the region), never from ``--base-url`` / ``OPENAI_BASE_URL``
    pointing elsewhere: a DashScope key must not travel to a third-party server.
    """
    if api != "openai":
        return True
    if base_url is None and not environ.get(ENV_OPENAI_BASE_URL):
        return True
    import httpx

    try:  # the parser that will send the request decides where it goes
        host = httpx.URL(base_url or environ[ENV_OPENAI_BASE_URL]).host.lower()
    except httpx.InvalidURL:
        return False
    return host.endswith(".aliyuncs.com")


def api_key_from_env(api: str, environ: Mapping[str, str] = os.environ, *, dashscope: bool = True) -> str:
    """The key for the run: ``DASHSCOPE_API_KEY`` for DashScope, else ``OPENAI_API_KEY``.

    With ``--api openai`` to DashScope, ``OPENAI_API_KEY`` is the fallback; to any other server
    (``dashscope=False``) it is the only key used.
    """
    ours = environ.get(ENV_API_KEY, "").strip()
    theirs = environ.get(ENV_OPENAI_KEY, "").strip() if api == "openai" else ""
    if not dashscope:
        return theirs
    return ours or theirs


def no_key_message(api: str, *, dashscope: bool = True) -> str:
    if api == "openai" and not dashscope:
        return (
            f"no API key for this server: set {ENV_OPENAI_KEY} (one that checks no key "
            f"takes any value, e.g. none); {ENV_API_KEY} is sent only to DashScope hosts"
        )
    if api == "openai":
        return f"no API key: set {ENV_API_KEY} (or {ENV_OPENAI_KEY}), or pass --simulate"
    return NO_KEY


def compatible_url(native_base: str) -> str:
    """A DashScope native base URL (``.../api/v1``) as its OpenAI-compatible one."""
    base = native_base.rstrip("/")
    if base.endswith(NATIVE_PREFIX):
        return base[: -len(NATIVE_PREFIX)] + COMPATIBLE_PREFIX
    return base


def resolve_base_url(
    base_url: str | None, region: str | None, environ: Mapping[str, str] = os.environ, api: str = "dashscope"
) -> str:
    """``--base-url``, else the environment, else the region's URL (default intl).

    With ``--api openai``: ``OPENAI_BASE_URL`` comes first among the variables, and DashScope
    URLs (``DASHSCOPE_HTTP_BASE_URL``, regions) become their ``/compatible-mode/v1`` twins.
    """
    if base_url:
        return base_url
    if api == "openai" and environ.get(ENV_OPENAI_BASE_URL):
        return environ[ENV_OPENAI_BASE_URL]
    convert = compatible_url if api == "openai" else (lambda url: url)
    if environ.get(ENV_BASE_URL):
        return convert(environ[ENV_BASE_URL])
    name = (region or environ.get(ENV_REGION) or "intl").strip().lower()
    name = REGION_ALIASES.get(name, name)
    if name not in REGION_BASE_URLS:
        raise UsageError(
            f"unknown region {region or environ.get(ENV_REGION)!r}: use one of "
            f"{', '.join(REGION_BASE_URLS)} (or --base-url)"
        )
    return convert(REGION_BASE_URLS[name])


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be a whole number, got {value!r}")
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _validate_one(key: str, value: Any) -> None:
    """DashScope's documented ranges, checked so a typo fails here and not on every row."""
    if key == "temperature":
        _check(0 <= _number(key, value) < 2, f"temperature must be in [0, 2), got {value}")
    elif key == "top_p":
        _check(0 < _number(key, value) <= 1, f"top_p must be in (0, 1], got {value}")
    elif key == "top_k":
        _check(_integer(key, value) >= 0, f"top_k must be 0 or more, got {value}")
    elif key == "max_tokens":
        _check(_integer(key, value) >= 1, f"max_tokens must be at least 1, got {value}")
    elif key == "seed":
        _check(0 <= _integer(key, value) <= 2**31 - 1, f"seed must be in [0, 2^31-1], got {value}")
    elif key == "thinking_budget":
        _check(_integer(key, value) >= 1, f"thinking_budget must be at least 1, got {value}")
    elif key == "n":
        _check(1 <= _integer(key, value) <= 4, f"n must be 1 to 4, got {value}")
    elif key in ("presence_penalty",):
        _check(-2 <= _number(key, value) <= 2, f"{key} must be in [-2, 2], got {value}")
    elif key == "repetition_penalty":
        _check(_number(key, value) > 0, f"repetition_penalty must be above 0, got {value}")
    elif key in ("enable_thinking", "enable_search"):
        _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
    elif key == "stop":
        _check(
            isinstance(value, str)
            or (isinstance(value, list) and value != [] and all(isinstance(s, str) and s for s in value)),
            f"stop must be a string or a list of non-empty strings, got {value!r}",
        )
    elif key == "result_format":
        _check(value == "message", "result_format is always 'message' in batchgen; drop it")
    elif key in ("stream", "incremental_output", "stream_options"):
        raise UsageError(f"{key} is batchgen's to set: use --stream or --no-stream instead of --param {key}")
    elif key == "response_format":
        _check(
            isinstance(value, dict) and value.get("type") in ("text", "json_object", "json_schema"),
            'response_format must be {"type": "json_object"} or a json_schema object: '
            "use --json or --json-schema FILE",
        )


# The generation parameters DashScope's native API or an OpenAI-compatible server documents.
# Anything else is still sent (the APIs grow faster than this list), with a warning: it is far
# more often a typo (``temprature``) that the server would silently ignore.
KNOWN_PARAMETERS = frozenset(
    {
        "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed", "stop", "n",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
        "top_logprobs", "enable_thinking", "thinking_budget", "reasoning_effort", "enable_search",
        "search_options", "forced_search", "tools", "tool_choice", "parallel_tool_calls",
        "response_format", "result_format", "incremental_output", "stream", "stream_options",
        "vl_high_resolution_images", "vl_enable_image_hw_output", "max_pixels", "min_pixels",
        "translation_options", "enable_code_interpreter", "modalities", "audio", "user",
        "max_input_tokens", "partial", "prediction", "service_tier", "metadata", "store",
    }
)  # fmt: skip


def unknown_parameters(parameters: Mapping[str, Any]) -> list[str]:
    """The parameter names neither API documents, each with the known name it most resembles."""
    import difflib

    unknown = []
    for key in parameters:
        if key not in KNOWN_PARAMETERS:
            close = difflib.get_close_matches(key, KNOWN_PARAMETERS, n=1)
            unknown.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return unknown


def validate_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Check every known generation parameter; unknown ones pass through as the SDK does."""
    checked = {}
    for key, value in parameters.items():
        if value is None:
            continue
        _validate_one(key, value)
        checked[key] = value
    return checked


def parse_param_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``--param KEY=JSON`` pairs into a dict; a bare word that is not JSON is taken as a string."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--param {pair!r} is not KEY=VALUE, e.g. --param presence_penalty=0.5")
        try:
            parsed[key] = json.loads(raw)
        except ValueError:
            parsed[key] = raw
    return parsed
