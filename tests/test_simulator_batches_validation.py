"""The simulator's Batch API validating input files: what fails a batch, with which code,
message, param and line number."""

from __future__ import annotations

from typing import Any

import pytest
from simulator_support import (
    CHAT_URL,
    EPOCH,
    PACE,
    TEST_URL,
    batch_api,
    batch_line,
    counts,
    create_batch,
    get_batch,
    run_to_end,
)

from batchgen.simulator import BatchLimits

MISMATCHED_MODEL = (
    "The model 'qwen-max' for this request does not match the rest of the batch. "
    "Each batch must contain requests for a single model."
)
THINKING_ON = (
    "Thinking is on for this request but off for the rest of the batch. Each batch must use a single "
    "thinking mode: set enable_thinking the same way on every line."
)
THINKING_OFF = (
    "Thinking is off for this request but on for the rest of the batch. Each batch must use a single "
    "thinking mode: set enable_thinking the same way on every line."
)
DUPLICATE = (
    "The custom_id 'a' for this request is a duplicate of another request. "
    "The custom_id parameter must be unique for each request in a batch."
)
NOT_JSON = "This line is not parseable as valid JSON."


def error(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


@pytest.mark.parametrize(
    ("lines", "errors"),
    [
        pytest.param(
            [batch_line("a"), batch_line("b", model="qwen-max"), batch_line("c")],
            [error("mismatched_model", MISMATCHED_MODEL, "body.model", 2)],
            id="mixed-model",
        ),
        pytest.param(
            [batch_line("a"), batch_line("b", enable_thinking=True)],
            [error("mismatched_thinking_mode", THINKING_ON, "body.enable_thinking", 2)],
            id="mixed-thinking",
        ),
        pytest.param(
            # qwen3-8b thinks unless told not to: the first line thinks, the second does not.
            [batch_line("a", model="qwen3-8b"), batch_line("b", model="qwen3-8b", enable_thinking=False)],
            [error("mismatched_thinking_mode", THINKING_OFF, "body.enable_thinking", 2)],
            id="mixed-thinking-by-default",
        ),
        pytest.param(
            [batch_line("a"), batch_line("b"), batch_line("a")],
            [error("duplicate_custom_id", DUPLICATE, "custom_id", 3)],
            id="duplicate-custom-id",
        ),
        pytest.param(
            [batch_line("a", url="/v1/chat/completion"), batch_line("b", url=TEST_URL)],
            [
                error(
                    "url_not_found",
                    "The provided url '/v1/chat/completion' is not supported by the Batch API.",
                    "url",
                    1,
                ),
                error(
                    "mismatched_url",
                    f"The url '{TEST_URL}' of this request does not match the batch's endpoint '{CHAT_URL}'.",
                    "url",
                    2,
                ),
            ],
            id="wrong-url",
        ),
        pytest.param(
            ["", batch_line("a"), '{"custom_id": "b", ', "", "[1, 2]"],
            [error("invalid_json_line", NOT_JSON, None, 3), error("invalid_json_line", NOT_JSON, None, 5)],
            id="bad-json-blank-lines-counted",
        ),
        pytest.param(
            [
                {**batch_line("a"), "custom_id": 7},
                {**batch_line("b"), "method": "GET"},
                {**batch_line("c"), "body": {"messages": []}},
                batch_line("d", model="gpt-4o"),
            ],
            [
                error(
                    "missing_required_parameter", "Missing required parameter: 'custom_id'.", "custom_id", 1
                ),
                error("invalid_method", "The method 'GET' is not supported; use POST.", "method", 2),
                error(
                    "missing_required_parameter", "Missing required parameter: 'body.model'.", "body.model", 3
                ),
                error(
                    "model_not_found",
                    "The model 'gpt-4o' does not exist or you do not have access to it.",
                    "body.model",
                    4,
                ),
            ],
            id="fields",
        ),
        pytest.param(
            [], [error("empty_file", "The batch input file is empty.", None, None)], id="empty-file"
        ),
    ],
)
def test_a_bad_input_file_fails_the_batch_with_its_line_numbers(
    lines: list[Any], errors: list[dict[str, Any]]
) -> None:
    with batch_api(**PACE) as (http, sim, clock):
        created = create_batch(http, lines)
        clock.advance(9)
        assert get_batch(http, created["id"])["status"] == "validating"
        clock.advance(1)
        failed = get_batch(http, created["id"])
        clock.advance(10_000)
        later = get_batch(http, created["id"])

    expected = {
        **created,
        "status": "failed",
        "failed_at": EPOCH + 10,
        "errors": {"object": "list", "data": errors},
    }
    assert failed == later == expected
    assert sim.stats.batch.executed == []


def test_one_thinking_mode_said_two_ways_is_one_mode() -> None:
    # qwen-plus thinks only when told to: omitting enable_thinking and sending false agree.
    with batch_api(**PACE) as (http, _, clock):
        lines = [batch_line("a"), batch_line("b", enable_thinking=False)]
        batch = run_to_end(http, clock, create_batch(http, lines)["id"])
    assert (batch["status"], batch["request_counts"]) == ("completed", counts(2, 2, 0))


@pytest.mark.parametrize(
    ("limits", "lines", "endpoint", "errors"),
    [
        pytest.param(
            BatchLimits(lines=3),
            [batch_line(str(n)) for n in range(4)],
            CHAT_URL,
            [
                error(
                    "too_many_requests",
                    "The batch input file has 4 requests, more than the maximum of 3.",
                    None,
                    None,
                )
            ],
            id="lines",
        ),
        pytest.param(
            BatchLimits(line_bytes=300),
            [batch_line("a"), batch_line("b", "x" * 300)],
            CHAT_URL,
            [error("line_too_large", "This line is larger than the maximum of 300 bytes.", None, 2)],
            id="line-bytes",
        ),
        pytest.param(
            BatchLimits(),
            [batch_line(str(n), url=TEST_URL, model="batch-test-model") for n in range(101)],
            TEST_URL,
            [
                error(
                    "too_many_requests",
                    "The batch input file has 101 requests, more than the maximum of 100.",
                    None,
                    None,
                )
            ],
            id="test-model-lines",
        ),
        pytest.param(
            BatchLimits(),
            [batch_line("a", url=TEST_URL)],
            TEST_URL,
            [
                error(
                    "model_not_found",
                    "The model 'qwen-plus' cannot be used on /v1/chat/ds-test; use batch-test-model.",
                    "body.model",
                    1,
                )
            ],
            id="test-endpoint-model",
        ),
    ],
)
def test_file_limits_fail_the_batch(
    limits: BatchLimits, lines: list[Any], endpoint: str, errors: list[dict[str, Any]]
) -> None:
    with batch_api(**PACE, batch_limits=limits) as (http, _, clock):
        batch = run_to_end(http, clock, create_batch(http, lines, endpoint=endpoint)["id"])
    assert (batch["status"], batch["errors"], batch["request_counts"]) == (
        "failed",
        {"object": "list", "data": errors},
        counts(0, 0, 0),
    )
