"""The service's errors: their messages, the test markers, and how the OpenAI route words them."""

from __future__ import annotations

import re
from typing import Any

from batchgen.simulator.config import FaultName

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


def _fault_error(fault: FaultName, route: str, sse: bool) -> _ApiError | None:
    """The error a fault answers with (fault_429, fault_500, fault_200_error), or None."""
    if fault == "fault_429":
        return _ApiError(429, "Throttling.RateQuota", _MSG_RATE_QUOTA, fault)
    if fault == "fault_500":
        return _ApiError(500, "InternalError", _MSG_INTERNAL, fault)
    if fault == "fault_200_error":
        # A non-streamed call gets the business error under HTTP 200; a stream has no
        # such thing (its errors are all under 200), so its event says the 500 it is.
        status = 500 if sse or route == "openai" else 200
        return _ApiError(status, "InternalError.Algo", _MSG_ALGO, fault)
    return None
