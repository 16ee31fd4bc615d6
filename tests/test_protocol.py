"""Parsing and classification against bodies recorded from the real service.

The bodies are quoted from shared/dashscope-protocol.md (captures of real traffic) and the
seed API page; they are copied byte for byte, not rebuilt from the simulator.
"""

from __future__ import annotations

import pytest

from batchgen.api.faults import classify, fatal_hint
from batchgen.api.models import route_for_model
from batchgen.api.native import build_body, interpret, parse_reply
from batchgen.api.types import APIError, Disposition, Reply

RECORDED_SUCCESS = b"""{"output": {"choices": [{"finish_reason": "stop",
                         "message": {"role": "assistant", "content": "\xe2\x80\xa6",
                                     "reasoning_content": "\xe2\x80\xa6"}}]},
 "usage": {"input_tokens": 12, "output_tokens": 21, "total_tokens": 33,
           "prompt_tokens_details": {"cached_tokens": 0},
           "output_tokens_details": {"reasoning_tokens": 20}},
 "request_id": "7c8beccf-3e76-9034-95c1-db1f1ab9d6e0"}"""

# The seed page's response, as the Python SDK prints it (status_code/code/message included).
SEED_SUCCESS = b"""{
  "status_code": 200,
  "request_id": "902fee3b-f7f0-9a8c-96a1-6b4ea25af114",
  "code": "",
  "message": "",
  "output": {
    "text": null,
    "finish_reason": null,
    "choices": [
      {
        "finish_reason": "stop",
        "message": {
          "role": "assistant",
          "content": "I am a large-scale language model developed by Alibaba Cloud. My name is Qwen.",
          "tool_calls": null,
          "reasoning_content": null
        }
      }
    ]
  },
  "usage": {
    "input_tokens": 22,
    "output_tokens": 17,
    "total_tokens": 39,
    "image_tokens": null,
    "video_tokens": null,
    "audio_tokens": null
  }
}"""

RECORDED_AUTH_ERROR = (
    b'{"code":"InvalidApiKey","message":"Invalid API-key provided.",'
    b'"request_id":"a1c0561c-1dfe-98a6-a62f-983577b8bc5e"}'
)

# One SSE data line from the protocol notes: finish_reason is the string "null" mid-stream.
RECORDED_SSE_DATA = (
    b'{"output":{"choices":[{"message":{"content":"1","role":"assistant"},'
    b'"finish_reason":"null"}]},"usage":{"total_tokens":9,"input_tokens":8,'
    b'"output_tokens":1},"request_id":"d272"}'
)


def test_recorded_success_is_flattened_to_columns():
    reply = interpret(200, {"x-request-id": "7c8beccf-3e76-9034-95c1-db1f1ab9d6e0"}, RECORDED_SUCCESS)
    assert reply == Reply(
        content="…",
        reasoning="…",
        finish_reason="stop",
        request_id="7c8beccf-3e76-9034-95c1-db1f1ab9d6e0",
        input_tokens=12,
        output_tokens=21,
        total_tokens=33,
        cached_tokens=0,
        reasoning_tokens=20,
    )


def test_seed_body_with_empty_code_is_a_success_and_nulls_stay_null():
    reply = interpret(200, {}, SEED_SUCCESS)
    assert isinstance(reply, Reply)
    assert reply.content.startswith("I am a large-scale language model")
    assert reply.reasoning is None
    assert reply.request_id == "902fee3b-f7f0-9a8c-96a1-6b4ea25af114"
    assert (reply.input_tokens, reply.output_tokens, reply.total_tokens) == (22, 17, 39)
    assert reply.cached_tokens is None and reply.reasoning_tokens is None


def test_recorded_auth_error_is_fatal_with_its_request_id():
    error = interpret(401, {}, RECORDED_AUTH_ERROR)
    assert isinstance(error, APIError)
    assert (error.code, error.http_status, error.disposition) == ("InvalidApiKey", 401, Disposition.FATAL)
    assert error.request_id == "a1c0561c-1dfe-98a6-a62f-983577b8bc5e"
    assert "DASHSCOPE_API_KEY" in fatal_hint(error)


def test_streamed_chunk_null_string_finish_reason_is_a_null():
    reply = parse_reply(__import__("json").loads(RECORDED_SSE_DATA))
    assert reply.finish_reason is None and reply.content == "1" and reply.total_tokens == 9


def test_multimodal_parts_content_is_joined_and_missing_usage_is_null():
    body = (
        b'{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assistant",'
        b'"content":[{"text":"Hello "},{"text":"there"}]}}]},"request_id":"r1"}'
    )
    reply = interpret(200, {}, body)
    assert reply.content == "Hello there"
    assert reply.input_tokens is None and reply.total_tokens is None


def test_http_200_with_error_code_is_an_error():
    body = b'{"code":"InternalError.Algo","message":"boom","request_id":"r2"}'
    error = interpret(200, {"x-request-id": "r2"}, body)
    assert isinstance(error, APIError)
    assert error.disposition is Disposition.RETRY and error.request_id == "r2"


@pytest.mark.parametrize(
    "raw", [b"", b"<html>502 Bad Gateway</html>", b'{"output": {"choi'], ids=["empty", "html", "truncated"]
)
def test_unparseable_bodies_are_retried(raw):
    error = interpret(200, {"x-request-id": "abc"}, raw)
    assert isinstance(error, APIError)
    assert error.code == "batchgen.BadResponse"
    assert error.disposition is Disposition.RETRY
    assert error.request_id == "abc"


def test_retry_after_header_is_kept():
    error = interpret(429, {"retry-after": "3"}, b'{"code":"Throttling","message":"x"}')
    assert error.retry_after == 3.0


@pytest.mark.parametrize(
    ("status", "code", "message", "expected"),
    [
        pytest.param(
            400,
            "InvalidParameter",
            "Range of top_p should be (0.0, 1.0]",
            Disposition.ROW_ERROR,
            id="invalid-parameter",
        ),
        pytest.param(
            400,
            "DataInspectionFailed",
            "Input data may contain inappropriate content.",
            Disposition.ROW_ERROR,
            id="moderation",
        ),
        pytest.param(413, "BadRequest.TooLarge", "too large", Disposition.ROW_ERROR, id="413"),
        pytest.param(
            400,
            "Arrearage",
            "Access denied, please make sure your account is in good standing.",
            Disposition.FATAL,
            id="arrearage",
        ),
        pytest.param(401, "InvalidApiKey", "Invalid API-key provided.", Disposition.FATAL, id="key"),
        pytest.param(403, "AccessDenied.Unpurchased", "x", Disposition.FATAL, id="unpurchased"),
        pytest.param(403, "AllocationQuota.FreeTierOnly", "x", Disposition.FATAL, id="free-tier"),
        pytest.param(
            429,
            "Throttling.AllocationQuota",
            "Free allocated quota exceeded.",
            Disposition.FATAL,
            id="free-quota",
        ),
        pytest.param(400, "InvalidParameter", "Model not exist.", Disposition.FATAL, id="no-model"),
        pytest.param(404, "ModelNotFound", "x", Disposition.FATAL, id="404"),
        pytest.param(
            400, "InvalidParameter", "url error, please check url！", Disposition.FATAL, id="wrong-route"
        ),
        pytest.param(408, "RequestTimeOut", "x", Disposition.RETRY, id="408"),
        pytest.param(409, "Conflict", "x", Disposition.RETRY, id="409"),
        pytest.param(
            429, "Throttling.RateQuota", "Requests rate limit exceeded", Disposition.RETRY, id="rpm"
        ),
        pytest.param(429, "Throttling", "Request rate increased too quickly", Disposition.RETRY, id="burst"),
        pytest.param(500, "InternalError", "x", Disposition.RETRY, id="500"),
        pytest.param(503, "ServiceUnavailable", "x", Disposition.RETRY, id="503"),
        # Compatible mode's TPM throttle, as recorded from the real service (realbodies OF5).
        pytest.param(
            429,
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details. For "
            "details, see: https://help.aliyun.com/zh/model-studio/error-code#token-limit",
            Disposition.RETRY,
            id="compatible-tpm",
        ),
        pytest.param(
            429, "insufficient_quota", "Free allocated quota exceeded.", Disposition.FATAL, id="compat-free"
        ),
        pytest.param(
            429,
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details. For more "
            "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes",
            Disposition.FATAL,
            id="openai-credit",
        ),
        pytest.param(
            429,
            "rate_limit_exceeded",
            "Rate limit reached for requests. Visit https://platform.openai.com/account/rate-limits",
            Disposition.RETRY,
            id="openai-rate-limit",
        ),
    ],
)
def test_classify(status, code, message, expected):
    assert classify(status, code, message) is expected


def test_compatible_token_throttle_slows_the_token_rate():
    from batchgen.ratelimit import TOKENS, throttle_kind

    assert throttle_kind("insufficient_quota", "You exceeded your current quota") == TOKENS


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assistant","tool_calls":'
            b'[{"function":{"name":"f","arguments":"{}"},"id":"c","type":"function"}],"content":""}}]},'
            b'"usage":{"input_tokens":5,"output_tokens":8},"request_id":"r"}',
            id="tool-call",
        ),
        pytest.param(
            b'{"output":{"choices":[{"finish_reason":"length","message":{"content":"",'
            b'"reasoning_content":"thinking","role":"assistant"}}]},"request_id":"r"}',
            id="cut-while-thinking",
        ),
        pytest.param(
            b'{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assistant",'
            b'"content":[]}}]},"request_id":"r"}',
            id="empty-parts",
        ),
    ],
)
def test_empty_content_is_a_null_reply(body):
    reply = interpret(200, {}, body)
    assert isinstance(reply, Reply)
    assert reply.content is None


@pytest.mark.parametrize(
    ("model", "route"),
    [
        ("qwen-plus", "text"),
        ("qwen-max-latest", "text"),
        ("qwen3-max", "text"),
        ("qwen-plus-2025-07-28", "text"),
        ("qwq-plus", "text"),
        ("qwen3-coder-plus", "text"),
        ("qwen3.5-plus", "multimodal"),
        ("qwen3.6-plus", "multimodal"),
        ("qwen3.7-max", "multimodal"),
        ("qwen-vl-max", "multimodal"),
        ("qwen3-vl-plus", "multimodal"),
        ("qwen-omni-turbo", "multimodal"),
        ("qwen2.5-vl-72b-instruct", "multimodal"),
        ("qvq-max", "multimodal"),
    ],
)
def test_route_for_model(model, route):
    assert route_for_model(model) == route


def test_body_has_three_keys_and_multimodal_wraps_every_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = build_body("qwen-plus", messages, {"temperature": 0.5}, "text")
    assert text == {
        "model": "qwen-plus",
        "input": {"messages": messages},
        "parameters": {"result_format": "message", "temperature": 0.5},
    }
    multi = build_body("qwen3.6-plus", messages, {}, "multimodal")
    assert multi["input"]["messages"] == [
        {"role": "system", "content": [{"text": "Be brief."}]},
        {"role": "user", "content": [{"text": "Hi"}]},
    ]
    assert messages[0]["content"] == "Be brief."  # the caller's list is not modified


@pytest.mark.parametrize(
    "raw",
    [
        b'{"output": "oops"}',
        b'{"output": {"choices": "x"}}',
        b'{"request_id": "r"}',
        b'{"output": {"choices": [{"message": "hi"}]}, "usage": "none"}',
    ],
    ids=["output-str", "choices-str", "no-output", "message-str"],
)
def test_odd_200_bodies_never_crash(raw):
    result = interpret(200, {}, raw)
    if isinstance(result, APIError):
        assert result.code == "batchgen.BadResponse" and result.disposition is Disposition.RETRY
    else:  # a list of choices whose message is not an object: parsed as an empty answer
        assert result.content is None and result.input_tokens is None


def test_stream_only_models_stop_the_run_with_a_hint():
    error = interpret(
        400, {}, b'{"code":"InvalidParameter","message":"parameter.enable_thinking only support stream call"}'
    )
    assert error.disposition is Disposition.FATAL
    assert "--no-stream" in fatal_hint(error)
