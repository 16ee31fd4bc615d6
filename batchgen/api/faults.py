"""The fault table: what each error the services send means, and what the user can do about it.

One table serves both questions asked of an error: ``classify`` (retry it, record it as the
row's error, or stop the run) and ``fatal_hint`` (the one line printed when a run stops). An
entry matches an error by its exact code, a code prefix, or a phrase in its message (any of
those it gives, all of them when it gives several); the first entry that matches decides.
Where no entry decides, the HTTP status does. Sources: ``shared/dashscope-protocol.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchgen.api.types import APIError, Disposition, retry_after

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
FATAL_STATUSES = frozenset({401, 403, 404})
FATAL, RETRY = Disposition.FATAL, Disposition.RETRY


@dataclass(frozen=True, slots=True)
class Fault:
    """One row of the table. ``disposition`` None: the status decides, the hint still applies.

    ``only_unstatused``: the entry decides only for HTTP 200 bodies (and errors without a
    status), where a code is all there is to go by; under an error status, the status rules.
    """

    disposition: Disposition | None
    hint: str | None = None
    code: str | None = None
    prefix: str | None = None
    phrase: str | None = None  # lower case
    only_unstatused: bool = False

    def matches(self, code: str, lowered: str) -> bool:
        return (
            (self.code is None or code == self.code)
            and (self.prefix is None or code.startswith(self.prefix))
            and (self.phrase is None or self.phrase in lowered)
        )


_KEY = (
    "the server rejected the API key: check DASHSCOPE_API_KEY (or OPENAI_API_KEY with --api openai) "
    "and its region"
)
_NO_MODEL = "no such model in this region: check -m/--model and --region"
_ACCESS = (
    "the account or workspace may not use this model: check the model name and "
    "--workspace / DASHSCOPE_WORKSPACE_ID, or buy access in the console"
)
_STREAM = (
    "this model or mode answers only streamed calls: drop --no-stream (batchgen "
    "streams such models and every thinking request by itself), or turn thinking "
    "off with --disable-thinking where the model allows it"
)

FAULTS: tuple[Fault, ...] = (
    Fault(
        FATAL,
        "the service cannot be reached: check --base-url / --region, the network and any proxy "
        "(HTTPS_PROXY, NO_PROXY)",
        code="batchgen.Unreachable",
    ),
    Fault(FATAL, _KEY, code="invalid_api_key"),
    Fault(
        FATAL,
        "DashScope rejected the API key: check DASHSCOPE_API_KEY, and that the key belongs to the "
        "region of the base URL (--region / --base-url)",
        code="InvalidApiKey",
    ),
    Fault(FATAL, "the Alibaba Cloud account is overdue: top up the account, then re-run", code="Arrearage"),
    Fault(
        FATAL,
        "the model's free tier is used up and the account is in free-tier-only mode: turn that "
        "off in the Model Studio console",
        code="AllocationQuota.FreeTierOnly",
    ),
    # Compatible mode answers a token-rate overshoot with 429 insufficient_quota ("You exceeded
    # your current quota ... #token-limit"): a throttle, below. Only these wordings mean that
    # paying more is the fix.
    Fault(
        FATAL,
        "the free quota of this model is used up: enable paid usage in the Model Studio console "
        "or pick another model",
        phrase="free allocated quota exceeded",
    ),
    Fault(
        FATAL,
        "the account's quota or credit is used up: top it up or pick another model",
        code="insufficient_quota",
        phrase="platform.openai.com",  # OpenAI's own: no credit left
    ),
    Fault(FATAL, _ACCESS, prefix="AccessDenied"),
    Fault(FATAL, _ACCESS, code="access_denied"),
    Fault(
        FATAL,
        "the model is not served on this route: qwen3.5+/VL/omni models need --endpoint "
        "multimodal, text models --endpoint text",
        phrase="url error",
    ),
    Fault(FATAL, _STREAM, phrase="non-streaming calls"),
    Fault(FATAL, _STREAM, phrase="only support stream"),
    Fault(FATAL, _STREAM, phrase="stream=false"),
    Fault(FATAL, _NO_MODEL, phrase="model not exist"),
    Fault(FATAL, _NO_MODEL, code="Model.NotExist"),
    Fault(FATAL, _NO_MODEL, code="ModelNotFound"),
    Fault(FATAL, "no such model on this server: check -m/--model", code="model_not_found"),
    Fault(FATAL, "the request names no model: give -m/--model", code="BadRequest.EmptyModel"),
    Fault(FATAL, "the base URL points at no such endpoint: check --base-url", code="InvalidURL"),
    Fault(None, "the endpoint was not found: check --base-url / DASHSCOPE_HTTP_BASE_URL", code="NotFound"),
    # HTTP 200 bodies carrying one of these codes are transient server trouble, not a verdict.
    *(
        Fault(RETRY, prefix=prefix, only_unstatused=True)
        for prefix in (
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
    ),
)
DEFAULT_HINT = "the service refused the request for every row"


def find(code: str, message: str) -> Fault | None:
    """The table's entry for an error: the first that matches, or None."""
    lowered = message.lower()
    return next((f for f in FAULTS if f.matches(code, lowered)), None)


def classify(http_status: int | None, code: str, message: str) -> Disposition:
    """What to do after an error: a pure function of what the server said."""
    fault = find(code, message)
    if fault is not None and fault.disposition is not None and not fault.only_unstatused:
        return fault.disposition
    if http_status in FATAL_STATUSES:
        return Disposition.FATAL
    if http_status in RETRYABLE_STATUSES:
        return Disposition.RETRY
    if http_status == 200 or http_status is None:
        return (
            fault.disposition
            if fault is not None and fault.disposition is not None
            else Disposition.ROW_ERROR
        )
    return Disposition.ROW_ERROR  # 400 InvalidParameter, DataInspectionFailed, 413, ...


def fatal_hint(error: APIError) -> str:
    """The one-line explanation printed when a run stops on ``error``."""
    fault = find(error.code, error.message)
    hint = fault.hint if fault is not None and fault.hint else DEFAULT_HINT
    status = f"HTTP {error.http_status} " if error.http_status else ""
    said = f" ({error.message.strip()})" if error.message.strip() else ""
    return f"{status}{error.code}{said}: {hint}"


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
        http_status, code, message, headers.get("x-request-id"), disposition, retry_after(headers)
    )
