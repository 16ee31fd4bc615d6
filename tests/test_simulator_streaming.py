"""The simulator's native event streams, and the models that answer only streamed calls."""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import httpx
import pytest
from simulator_support import (
    AUTH,
    HI,
    INSPECTED,
    MULTIMODAL,
    OUTPUT_INSPECTION,
    RATE,
    SSE,
    STREAM_ONLY,
    TEXT,
    THINKING_STREAM_ONLY,
    assert_error,
    assert_stream_error,
    joined,
    native_events,
    parse_native_events,
    received_until_cut,
    reply_of,
    send_with,
    text_body,
)

from batchgen.simulator import (
    IMAGE_TOKENS,
    SimulatorConfig,
    SimulatorThread,
    count_tokens,
    only_streamed,
    simulated_reply,
)

# --- native streaming ---------------------------------------------------------------------


def test_native_stream_sends_cumulative_events_by_default(sim: SimulatorThread, client: httpx.Client) -> None:
    before = sim.stats.streamed
    response = client.post(TEXT, json=text_body(), headers=SSE)

    events = native_events(response)
    expected = simulated_reply("qwen-plus", HI)
    request_id = response.headers["x-request-id"]
    assert len(events) >= 2
    assert "[DONE]" not in response.text
    texts = [data["output"]["choices"][0]["message"]["content"] for _, _, data in events]
    assert all(later.startswith(earlier) and later != earlier for earlier, later in pairwise(texts))
    assert texts[-1] == expected.content
    reasons = [data["output"]["choices"][0]["finish_reason"] for _, _, data in events]
    assert reasons == ["null"] * (len(events) - 1) + ["stop"]
    first = events[0][2]
    assert first["output"]["choices"][0]["message"]["role"] == "assistant"
    assert first["usage"]["output_tokens"] == count_tokens(texts[0])
    assert events[-1][2]["usage"] == {
        "input_tokens": expected.input_tokens,
        "output_tokens": expected.output_tokens,
        "total_tokens": expected.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert sim.stats.served[request_id] == expected.content
    assert sim.stats.streamed == before + 1


def test_native_stream_incremental_deltas_join_up_to_the_reply(client: httpx.Client) -> None:
    response = client.post(TEXT, json=text_body(incremental_output=True), headers=SSE)

    events = native_events(response)
    deltas = [data["output"]["choices"][0]["message"]["content"] for _, _, data in events]
    content, reasoning, finish_reason, usage = joined(events)
    assert len(deltas) >= 2 and all(deltas)
    assert content == simulated_reply("qwen-plus", HI).content
    assert (reasoning, finish_reason) == (None, "stop")
    outputs = [data["usage"]["output_tokens"] for _, _, data in events]
    assert outputs == sorted(outputs) and outputs[-1] == usage["output_tokens"]


def test_native_stream_sends_reasoning_deltas_before_content(client: httpx.Client) -> None:
    body = text_body(enable_thinking=True, incremental_output=True, thinking_budget=40)
    response = client.post(TEXT, json=body, headers=SSE)

    events = native_events(response)
    messages = [data["output"]["choices"][0]["message"] for _, _, data in events]
    split = next(i for i, message in enumerate(messages) if message["content"])
    assert split >= 2
    assert all(m["reasoning_content"] and m["content"] == "" for m in messages[:split])
    assert all(m["content"] and m["reasoning_content"] == "" for m in messages[split:])
    expected = reply_of(body)
    content, reasoning, finish_reason, usage = joined(events)
    assert (content, reasoning, finish_reason) == (expected.content, expected.reasoning, "stop")
    assert usage["output_tokens_details"] == {"reasoning_tokens": expected.reasoning_tokens}
    reasoning_counts = [data["usage"]["output_tokens_details"]["reasoning_tokens"] for _, _, data in events]
    assert reasoning_counts[split - 1] == reasoning_counts[-1] == expected.reasoning_tokens
    assert reasoning_counts[0] < expected.reasoning_tokens


MM_IMAGE = "data:image/png;base64,iVBORw0KGgo="
MM_MESSAGES = [{"role": "user", "content": [{"image": MM_IMAGE}, {"text": "What is it?"}]}]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(TEXT, text_body(), id="text"),
        pytest.param(TEXT, text_body(max_tokens=7), id="text-cut"),
        pytest.param(TEXT, text_body(enable_thinking=True, thinking_budget=25, max_tokens=9), id="thinking"),
        pytest.param(TEXT, text_body(result_format="text"), id="result-format-text"),
        pytest.param(
            MULTIMODAL, {"model": "qwen3.5-plus", "input": {"messages": MM_MESSAGES}}, id="multimodal"
        ),
        pytest.param(
            MULTIMODAL,
            {
                "model": "qwen3-vl-plus",
                "input": {"messages": MM_MESSAGES},
                "parameters": {"enable_thinking": True},
            },
            id="multimodal-thinking",
        ),
    ],
)
def test_a_streamed_call_gets_the_non_streamed_reply(client: httpx.Client, path: str, body: dict) -> None:
    plain = client.post(path, json=body).json()
    streamed_body = {**body, "parameters": {**body.get("parameters", {}), "incremental_output": True}}
    events = native_events(client.post(path, json=streamed_body, headers=SSE))

    if "text" in plain["output"]:
        content = "".join(data["output"]["text"] for _, _, data in events)
        assert content == plain["output"]["text"]
        assert events[-1][2]["output"]["finish_reason"] == plain["output"]["finish_reason"]
        assert events[-1][2]["usage"] == plain["usage"]
        return
    content, reasoning, finish_reason, usage = joined(events)
    choice = plain["output"]["choices"][0]
    expected_content = choice["message"]["content"]
    if isinstance(expected_content, list):
        expected_content = expected_content[0]["text"]
    assert content == expected_content
    assert reasoning == choice["message"].get("reasoning_content")
    assert finish_reason == choice["finish_reason"]
    assert usage == plain["usage"]


def test_multimodal_stream_content_is_a_parts_list(client: httpx.Client) -> None:
    body = {
        "model": "qwen3.5-plus",
        "input": {"messages": MM_MESSAGES},
        "parameters": {"enable_thinking": True, "incremental_output": True, "thinking_budget": 20},
    }
    events = native_events(client.post(MULTIMODAL, json=body, headers=SSE))

    contents = [data["output"]["choices"][0]["message"]["content"] for _, _, data in events]
    reasoning_only = [
        c
        for c, (_, _, d) in zip(contents, events, strict=True)
        if d["output"]["choices"][0]["message"]["reasoning_content"]
    ]
    assert reasoning_only and all(c == [] for c in reasoning_only)
    answer = contents[len(reasoning_only) :]
    assert len(answer) >= 2 and all(len(c) == 1 and c[0]["text"] for c in answer)
    usage = events[-1][2]["usage"]
    assert usage["image_tokens"] == IMAGE_TOKENS
    assert usage["input_tokens_details"]["image_tokens"] == IMAGE_TOKENS


def test_qwq_streams_its_reasoning(client: httpx.Client) -> None:
    body = text_body(model="qwq-plus", incremental_output=True)
    events = native_events(client.post(TEXT, json=body, headers=SSE))

    expected = simulated_reply("qwq-plus", HI)
    content, reasoning, _, usage = joined(events)
    assert (content, reasoning) == (expected.content, expected.reasoning)
    assert usage["output_tokens"] == expected.output_tokens


@pytest.mark.parametrize(
    "parameters",
    [
        pytest.param({"enable_thinking": True}, id="thinking-not-incremental"),
        pytest.param({"enable_thinking": True, "incremental_output": False}, id="incremental-false"),
    ],
)
def test_thinking_stream_requires_incremental_output(client: httpx.Client, parameters: dict) -> None:
    response = client.post(TEXT, json=text_body(**parameters), headers=SSE)

    assert_stream_error(
        response,
        400,
        "InvalidParameter",
        "The incremental_output parameter must be true when enable_thinking is true.",
    )


@pytest.mark.parametrize(
    ("model", "parameters"),
    [
        pytest.param("qwq-plus", {}, id="qwq"),
        pytest.param("qwen3-32b", {}, id="open-qwen3-thinks-by-default"),
    ],
)
def test_models_that_always_think_need_incremental_output_too(
    client: httpx.Client, model: str, parameters: dict
) -> None:
    response = client.post(TEXT, json=text_body(model=model, **parameters), headers=SSE)

    assert_stream_error(
        response,
        400,
        "InvalidParameter",
        "The incremental_output parameter must be true when enable_thinking is true.",
    )


@pytest.mark.parametrize(
    ("config", "headers", "body", "count", "status", "code", "message"),
    [
        pytest.param(
            SimulatorConfig(),
            {"Authorization": "Bearer sk-wrong"},
            text_body(),
            1,
            401,
            "InvalidApiKey",
            "Invalid API-key provided.",
            id="bad-key",
        ),
        pytest.param(
            SimulatorConfig(rpm=1), {}, text_body(), 2, 429, "Throttling.RateQuota", RATE, id="rpm-quota"
        ),
        pytest.param(
            SimulatorConfig(tpm=1),
            {},
            text_body(),
            2,
            429,
            "Throttling.AllocationQuota",
            "Allocated quota exceeded, please increase your quota limit.",
            id="tpm-quota",
        ),
        pytest.param(
            SimulatorConfig(fault_429=1.0),
            {},
            text_body(),
            1,
            429,
            "Throttling.RateQuota",
            RATE,
            id="fault_429",
        ),
        pytest.param(
            SimulatorConfig(fault_500=1.0),
            {},
            text_body(),
            1,
            500,
            "InternalError",
            "An internal error has occured, please try again later or contact service support.",
            id="fault_500",
        ),
        pytest.param(
            SimulatorConfig(fault_200_error=1.0),
            {},
            text_body(),
            1,
            500,
            "InternalError.Algo",
            "An error occurred in model serving, error message is: [Internal server error!]",
            id="fault_200_error-says-500",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            text_body(messages=[{"role": "user", "content": "[sim:Arrearage]"}]),
            1,
            400,
            "Arrearage",
            "Access denied, please make sure your account is in good standing.",
            id="marker",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            text_body(messages=[{"role": "user", "content": "[sim:TooLarge]"}]),
            1,
            413,
            "BadRequest.TooLarge",
            "Request body too large.",
            id="too-large-marker",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            text_body(top_p=0),
            1,
            400,
            "InvalidParameter",
            "Range of top_p should be (0.0, 1.0]",
            id="validation",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            text_body(model="gpt-4o"),
            1,
            400,
            "InvalidParameter",
            "Model not exist.",
            id="unknown-model",
        ),
    ],
)
def test_errors_of_a_native_stream_are_events_under_http_200(
    config: SimulatorConfig, headers: dict, body: dict, count: int, status: int, code: str, message: str
) -> None:
    response, stats = send_with(config, TEXT, body, headers={**SSE, **headers}, count=count)

    assert_stream_error(response, status, code, message)
    assert stats.streamed == count  # the first of two got through and streamed its reply
    assert len(stats.served) == count - 1


def test_a_stream_request_to_an_unknown_route_is_a_plain_404(client: httpx.Client) -> None:
    response = client.post("/services/aigc/text-generation/nowhere", json=text_body(), headers=SSE)

    assert_error(response, 404, "NotFound", "Not Found")


def test_a_too_large_stream_request_is_an_error_event() -> None:
    body = text_body(messages=[{"role": "user", "content": "a" * (16 * 1024 * 1024)}])
    response, _ = send_with(SimulatorConfig(), TEXT, body, headers=SSE)

    assert_stream_error(response, 413, "BadRequest.TooLarge", "Request body too large.")


def test_truncate_fault_cuts_a_stream(client: httpx.Client) -> None:
    body = text_body(incremental_output=True)
    full = native_events(client.post(TEXT, json=body, headers=SSE))

    with (
        SimulatorThread(SimulatorConfig(fault_truncate=1.0)) as simulator,
        httpx.Client(base_url=simulator.base_url, headers=AUTH, timeout=10) as http,
    ):
        text = received_until_cut(http, TEXT, body, SSE)

    request_id = json.loads(text.split("data:", 1)[1].split("\n", 1)[0])["request_id"]
    events = parse_native_events(text, request_id)
    assert len(events) == len(full) // 2 >= 1
    assert all(data["output"]["choices"][0]["finish_reason"] == "null" for _, _, data in events)
    assert [d["output"] for _, _, d in events] == [d["output"] for _, _, d in full[: len(events)]]
    assert simulator.stats.outcomes == {"fault_truncate": 1}
    assert simulator.stats.served == {}
    assert simulator.stats.streamed == 1


def test_drop_fault_on_a_stream_closes_the_connection() -> None:
    error = None
    with (
        SimulatorThread(SimulatorConfig(fault_drop=1.0)) as simulator,
        httpx.Client(base_url=simulator.base_url, headers={**AUTH, **SSE}, timeout=10) as http,
    ):
        try:
            http.post(TEXT, json=text_body())
        except (httpx.RemoteProtocolError, httpx.ReadError) as caught:  # EOF, or a reset if the
            error = caught  # close raced the kernel still holding request bytes: no answer either way

    assert error is not None
    assert "without sending a response" in str(error) or "Connection reset" in str(error), error
    assert simulator.stats.streamed == 0


def test_output_inspection_marker_fails_a_plain_call(sim: SimulatorThread, client: httpx.Client) -> None:
    before = sim.stats.outcomes["error:DataInspectionFailed"]
    response = client.post(TEXT, json=text_body(messages=INSPECTED))

    assert_error(response, 400, "DataInspectionFailed", OUTPUT_INSPECTION)
    assert sim.stats.outcomes["error:DataInspectionFailed"] == before + 1


def test_output_inspection_marker_fails_a_stream_midway(sim: SimulatorThread, client: httpx.Client) -> None:
    response = client.post(TEXT, json=text_body(messages=INSPECTED, incremental_output=True), headers=SSE)

    events = native_events(response)
    request_id = response.headers["x-request-id"]
    assert [(kind, status) for kind, status, _ in events] == [("result", 200)] * 2 + [("error", 400)]
    assert all(data["output"]["choices"][0]["finish_reason"] == "null" for _, _, data in events[:2])
    assert events[2][2] == {
        "code": "DataInspectionFailed",
        "message": OUTPUT_INSPECTION,
        "request_id": request_id,
    }
    assert request_id not in sim.stats.served


# --- models that answer only streamed calls -------------------------------------------------


@pytest.mark.parametrize(
    ("model", "parameters", "expected"),
    [
        ("qwq-plus", {}, True),
        ("qwq-plus", {"enable_thinking": False}, True),
        ("qvq-max", {}, True),
        ("qwen-omni-turbo", {}, True),
        ("qwen3-omni-flash", {}, True),
        ("qwen3-8b", {}, True),
        ("qwen3-32b", {"enable_thinking": True}, True),
        ("qwen3-235b-a22b", {}, True),
        ("qwen3-30b-a3b", {}, True),
        ("qwen3-0.6b", {}, True),
        ("qwen3-8b", {"enable_thinking": False}, False),
        ("qwen3-235b-a22b-thinking-2507", {"enable_thinking": False}, True),
        ("qwen3-235b-a22b-instruct-2507", {}, False),
        ("qwen-plus", {}, False),
        ("qwen-plus", {"enable_thinking": True}, False),
        ("qwen-flash", {}, False),
        ("qwen-turbo", {}, False),
        ("qwen3-max", {}, False),
        ("qwen3.5-plus", {"enable_thinking": True}, False),
        ("qwen3-coder-plus", {}, False),
    ],
)
def test_only_streamed(model: str, parameters: dict, expected: bool) -> None:
    assert only_streamed(model, parameters) is expected


@pytest.mark.parametrize(
    ("path", "model", "parameters", "message"),
    [
        pytest.param(TEXT, "qwq-plus", {}, STREAM_ONLY, id="qwq"),
        pytest.param(TEXT, "qwq-plus", {"enable_thinking": False}, STREAM_ONLY, id="qwq-not-thinking"),
        pytest.param(MULTIMODAL, "qvq-max", {}, STREAM_ONLY, id="qvq"),
        pytest.param(MULTIMODAL, "qwen-omni-turbo", {}, STREAM_ONLY, id="qwen-omni"),
        pytest.param(MULTIMODAL, "qwen3-omni-flash", {}, STREAM_ONLY, id="qwen3-omni"),
        pytest.param(TEXT, "qwen3-8b", {}, THINKING_STREAM_ONLY, id="qwen3-8b-default"),
        pytest.param(
            TEXT, "qwen3-235b-a22b", {"enable_thinking": True}, THINKING_STREAM_ONLY, id="qwen3-235b"
        ),
    ],
)
def test_stream_only_models_refuse_plain_calls(
    client: httpx.Client, path: str, model: str, parameters: dict, message: str
) -> None:
    messages = [{"role": "user", "content": [{"text": "Hi"}]}]
    body = {"model": model, "input": {"messages": messages}, "parameters": parameters}

    assert_error(client.post(path, json=body), 400, "InvalidParameter", message)
    streamed = {**body, "parameters": {**parameters, "incremental_output": True}}
    assert native_events(client.post(path, json=streamed, headers=SSE))[-1][0] == "result"


def test_open_source_qwen3_answers_plainly_when_not_thinking(client: httpx.Client) -> None:
    body = client.post(TEXT, json=text_body(model="qwen3-8b", enable_thinking=False)).json()

    message = body["output"]["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert message["content"] == simulated_reply("qwen3-8b", HI, enable_thinking=False).content


def test_default_thinking_follows_the_model() -> None:
    def thinks(model: str, **options: Any) -> bool:
        return simulated_reply(model, HI, **options).reasoning is not None

    assert thinks("qwq-plus") and thinks("qwq-plus", enable_thinking=False)
    assert thinks("qvq-max")
    assert thinks("qwen3-8b") and thinks("qwen3-235b-a22b") and thinks("qwen3-32b", enable_thinking=True)
    assert not thinks("qwen3-8b", enable_thinking=False)
    for model in ("qwen-plus", "qwen-flash", "qwen-turbo", "qwen3-max", "qwen3.5-plus"):
        assert not thinks(model) and thinks(model, enable_thinking=True)
    assert simulated_reply("qwen3-8b", HI) == simulated_reply("qwen3-8b", HI, enable_thinking=True)
