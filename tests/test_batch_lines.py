"""The Batch API's lines: request lines, and the three result-line shapes (recorded ones first)."""

import json

import pytest

from batchgen.batch.lines import (
    ENDPOINT,
    MAX_LINE_BYTES,
    TOO_LARGE,
    line_problem,
    read_result_line,
    request_line,
)

# Recorded from the real service (cnblogs/dashscope-sdk RawHttpData/get-file-content-compatible).
RECORDED_OK = (
    '{"id":"153fa1be-abbc-4b52-80a6-c7ca92688fbc","custom_id":"1","response":{"status_code":200,'
    '"request_id":"153fa1be-abbc-4b52-80a6-c7ca92688fbc","body":{"created":1776432582,"usage":'
    '{"completion_tokens":49,"prompt_tokens":26,"total_tokens":75},"model":"qwen-flash","id":'
    '"chatcmpl-153fa1be-abbc-4b52-80a6-c7ca92688fbc","choices":[{"finish_reason":"stop","index":0,'
    '"message":{"role":"assistant","content":"你好！很高兴见到你"}}],"object":"chat.completion"}},'
    '"error":null}'
)
# The HTTP-failure and not-run shapes, as dashscope-protocol.md quotes them.
REFUSED = {
    "id": "req-9",
    "custom_id": "7",
    "response": {
        "status_code": 400,
        "request_id": "req-9",
        "body": {
            "error": {
                "message": "Input data may contain inappropriate content.",
                "type": "data_inspection_failed",
                "param": None,
                "code": "data_inspection_failed",
            }
        },
    },
    "error": None,
}
THROTTLED = {
    "id": "req-10",
    "custom_id": "8",
    "response": {
        "status_code": 500,
        "request_id": "req-10",
        "body": {
            "error": {
                "message": "An internal error has occured",
                "type": "internal_error",
                "code": "internal_error",
            }
        },
    },
    "error": None,
}
EXPIRED = {
    "id": "batch_req_3",
    "custom_id": "3",
    "response": None,
    "error": {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired.",
    },
}


def test_request_line_is_one_json_line_with_the_unstreamed_body():
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": "hé"}], "temperature": 0.5}
    raw = request_line("42", body)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert json.loads(raw) == {"custom_id": "42", "method": "POST", "url": ENDPOINT, "body": body}
    assert "hé".encode() in raw  # not escaped: the 6 MB limit counts bytes as sent


def test_a_line_over_six_mb_is_that_rows_too_large_error():
    assert line_problem(b"x" * MAX_LINE_BYTES) is None
    problem = line_problem(b"x" * (MAX_LINE_BYTES + 1))
    assert problem is not None and problem.code == TOO_LARGE and "6 MB a line" in problem.message


def test_a_recorded_answer_becomes_an_ok_row_billed_as_batch():
    line = read_result_line(RECORDED_OK, "qwen-flash", "batch_5b57")
    assert line is not None and line.final and line.custom_id == "1"
    r = line.result
    assert (r.status, r.reply, r.finish_reason) == ("ok", "你好！很高兴见到你", "stop")
    assert (r.input_tokens, r.output_tokens, r.total_tokens) == (26, 49, 75)
    assert r.request_id == "153fa1be-abbc-4b52-80a6-c7ca92688fbc"
    assert (r.billing_mode, r.batch_id, r.http_status, r.attempts) == ("batch", "batch_5b57", 200, 1)


def test_a_refused_line_is_a_permanent_row_error():
    line = read_result_line(json.dumps(REFUSED), "qwen-plus", "b1")
    assert line is not None and line.final and line.custom_id == "7"
    r = line.result
    assert (r.status, r.error_code, r.http_status, r.request_id) == (
        "error",
        "data_inspection_failed",
        400,
        "req-9",
    )
    assert r.error_message == "Input data may contain inappropriate content."
    assert r.reply is None and r.input_tokens is None and r.billing_mode == "batch"


def test_a_line_that_failed_transiently_is_sent_again():
    line = read_result_line(json.dumps(THROTTLED), "qwen-plus", "b1")
    assert line is not None and not line.final
    assert (line.result.status, line.result.error_code, line.result.http_status) == (
        "error",
        "internal_error",
        500,
    )


def test_a_line_never_run_is_free_and_sent_again():
    line = read_result_line(json.dumps(EXPIRED), "qwen-plus", "b2")
    assert line is not None and not line.final and line.custom_id == "3"
    r = line.result
    assert (r.status, r.error_code, r.attempts, r.http_status) == ("error", "batch_expired", 0, None)
    assert r.error_message.startswith("not run: This request could not be executed")
    assert r.input_tokens is None and r.output_tokens is None


@pytest.mark.parametrize("raw", ["", "not json", "[1]", '{"response": null}', '{"custom_id": 5}'])
def test_a_line_that_is_no_result_is_none(raw):
    assert read_result_line(raw, "m", "b") is None


def test_a_200_without_choices_is_an_error_sent_again():
    line = {"id": "r", "custom_id": "1", "response": {"status_code": 200, "request_id": "r", "body": {}}}
    got = read_result_line(json.dumps(line), "m", "b")
    assert got is not None and not got.final and got.result.error_code == "batchgen.BadResponse"
