"""The DashScope simulator, exercised over real loopback HTTP as batchgen's client will use it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchgen.simulator import (
    DEMO_KEY,
    IMAGE_TOKENS,
    SimReply,
    Simulator,
    SimulatorConfig,
    SimulatorStats,
    SimulatorThread,
    TokenBucket,
    count_tokens,
    image_id,
    only_streamed,
    simulated_reply,
)

TEXT = "/services/aigc/text-generation/generation"
MULTIMODAL = "/services/aigc/multimodal-generation/generation"
CHAT = "/chat/completions"  # under SimulatorThread.compatible_base_url
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
SSE = {"X-DashScope-SSE": "enable"}
HI = [{"role": "user", "content": "Hi there"}]


def text_body(
    model: str = "qwen-plus", messages: list[dict] | None = None, **parameters: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "input": {"messages": HI if messages is None else messages},
        "parameters": {"result_format": "message", **parameters},
    }


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    """One fault-free simulator shared by the tests that only look at answers."""
    with SimulatorThread() as simulator:
        yield simulator


@pytest.fixture()
def client(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=10) as http:
        yield http


def assert_error(response: httpx.Response, status: int, code: str, message: str) -> None:
    body = response.json()
    assert (response.status_code, body["code"], body["message"]) == (status, code, message)
    assert body["request_id"] == response.headers["x-request-id"]
    assert response.headers["content-type"] == "application/json"


def post_with(config: SimulatorConfig, body: dict[str, Any], **client_options: Any) -> Any:
    """Start a simulator with ``config``, send one text request, return (response or error, stats)."""
    with SimulatorThread(config) as simulator:
        options = {"timeout": 10, **client_options}
        with httpx.Client(base_url=simulator.base_url, headers=AUTH, **options) as http:
            try:
                result: Any = http.post(TEXT, json=body)
            except httpx.HTTPError as error:
                result = error
    return result, simulator.stats


def send_with(
    config: SimulatorConfig,
    path: str,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    count: int = 1,
    compatible: bool = False,
) -> tuple[httpx.Response, SimulatorStats]:
    """Start a simulator, POST ``body`` ``count`` times, return the last response and the stats."""
    with SimulatorThread(config) as simulator:
        base_url = simulator.compatible_base_url if compatible else simulator.base_url
        with httpx.Client(base_url=base_url, headers={**AUTH, **(headers or {})}, timeout=10) as http:
            for _ in range(count):
                response = http.post(path, json=body)
    return response, simulator.stats


def received_until_cut(http: httpx.Client, path: str, body: Any, headers: dict[str, str]) -> str:
    """What a stream delivered before its connection broke; fails if it ended cleanly."""
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        http.stream("POST", path, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream;charset=UTF-8"
        for chunk in response.iter_raw():
            received += chunk
    return received.decode()


def native_events(response: httpx.Response) -> list[tuple[str, int, dict[str, Any]]]:
    """(event, status, data) of each event of a native stream, checking each event's layout."""
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream;charset=UTF-8"
    return parse_native_events(response.text, response.headers["x-request-id"])


def parse_native_events(text: str, request_id: str) -> list[tuple[str, int, dict[str, Any]]]:
    assert text.endswith("\n\n")
    events = []
    for number, block in enumerate(text[:-2].split("\n\n"), start=1):
        id_line, event_line, status_line, data_line = block.split("\n")  # exactly four lines
        assert id_line == f"id:{number}"
        assert event_line in ("event:result", "event:error")
        assert status_line.startswith(":HTTP_STATUS/")
        assert data_line.startswith("data:{")
        data = json.loads(data_line.removeprefix("data:"))
        assert data["request_id"] == request_id
        events.append(
            (event_line.removeprefix("event:"), int(status_line.removeprefix(":HTTP_STATUS/")), data)
        )
    return events


def assert_stream_error(response: httpx.Response, status: int, code: str, message: str) -> None:
    """A native streamed call's error: HTTP 200, one event:error carrying the real status."""
    events = native_events(response)
    assert events == [
        ("error", status, {"code": code, "message": message, "request_id": response.headers["x-request-id"]})
    ]


def joined(events: list[tuple[str, int, dict[str, Any]]]) -> tuple[str, str | None, str, dict[str, Any]]:
    """(content, reasoning, finish_reason, usage) of an incremental native stream."""
    content, reasoning = "", None
    for kind, status, data in events:
        assert (kind, status) == ("result", 200)
        message = data["output"]["choices"][0]["message"]
        delta = message["content"]
        content += delta if isinstance(delta, str) else "".join(part["text"] for part in delta)
        if "reasoning_content" in message:
            reasoning = (reasoning or "") + message["reasoning_content"]
    last = events[-1][2]
    return content, reasoning, last["output"]["choices"][0]["finish_reason"], last["usage"]


def openai_chunks(response: httpx.Response) -> list[Any]:
    """The JSON chunks of an OpenAI stream, then the string "[DONE]" if it came."""
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream;charset=UTF-8"
    return parse_openai_chunks(response.text)


def parse_openai_chunks(text: str) -> list[Any]:
    assert text.endswith("\n\n")
    chunks: list[Any] = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ")
        payload = block.removeprefix("data: ")
        chunks.append(payload if payload == "[DONE]" else json.loads(payload))
    return chunks


def assert_openai_error(response: httpx.Response, status: int, code: str, kind: str, message: str) -> None:
    body = response.json()
    assert response.status_code == status
    assert body == {
        "error": {"message": message, "type": kind, "param": None, "code": code},
        "request_id": response.headers["x-request-id"],
    }
    assert response.headers["content-type"] == "application/json"


def reply_of(body: dict[str, Any]) -> SimReply:
    """simulated_reply for a native request body, as the server calls it."""
    parameters = body.get("parameters", {})
    return simulated_reply(
        body["model"],
        body["input"]["messages"],
        max_tokens=parameters.get("max_tokens"),
        enable_thinking=parameters.get("enable_thinking"),
        thinking_budget=parameters.get("thinking_budget"),
        response_format=parameters.get("response_format"),
    )


# --- success ------------------------------------------------------------------------------


def test_text_route_success_shape(sim: SimulatorThread, client: httpx.Client) -> None:
    response = client.post(TEXT, json=text_body())

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    expected = simulated_reply("qwen-plus", HI)
    request_id = body["request_id"]
    assert response.headers["x-request-id"] == request_id
    assert body == {
        "output": {
            "choices": [
                {
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": expected.content},
                }
            ]
        },
        "usage": {
            "input_tokens": expected.input_tokens,
            "output_tokens": expected.output_tokens,
            "total_tokens": expected.input_tokens + expected.output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
        "request_id": request_id,
    }
    assert expected.content.startswith('Qwen (simulated) on "Hi there": ')
    assert sim.stats.served[request_id] == expected.content


def test_multimodal_route_success_shape(sim: SimulatorThread, client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": [{"text": "Be brief."}]},
        {"role": "user", "content": [{"image": "https://example.com/cat.png"}, {"text": "What?"}]},
    ]
    body = {"model": "qwen3.5-plus", "input": {"messages": messages}}

    response = client.post(MULTIMODAL, json=body)

    assert response.status_code == 200
    data = response.json()
    expected = simulated_reply("qwen3.5-plus", messages)
    assert response.headers["x-request-id"] == data["request_id"]
    assert data["output"]["choices"][0]["message"] == {
        "role": "assistant",
        "content": [{"text": expected.content}],
    }
    assert expected.content.startswith(
        f'Qwen (simulated) on "What?" [1 image: {image_id("https://example.com/cat.png")}]: '
    )
    assert data["usage"] == {
        "input_tokens": expected.input_tokens,
        "output_tokens": expected.output_tokens,
        "total_tokens": expected.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "image_tokens": IMAGE_TOKENS,
        "input_tokens_details": {
            "text_tokens": expected.input_tokens - IMAGE_TOKENS,
            "image_tokens": IMAGE_TOKENS,
        },
    }
    assert sim.stats.served[data["request_id"]] == expected.content


def test_text_route_accepts_a_parts_list(client: httpx.Client) -> None:
    parts = [{"role": "user", "content": [{"text": "Hi "}, {"text": "there"}]}]

    response = client.post(TEXT, json=text_body(messages=parts))

    content = response.json()["output"]["choices"][0]["message"]["content"]
    assert content.startswith('Qwen (simulated) on "Hi there": ')


def test_result_format_text_gives_output_text(client: httpx.Client) -> None:
    response = client.post(TEXT, json=text_body(result_format="text"))

    assert response.json()["output"] == {
        "text": simulated_reply("qwen-plus", HI).content,
        "finish_reason": "stop",
    }


def test_large_body_is_accepted(client: httpx.Client) -> None:
    image = "data:image/png;base64," + "A" * (3 * 1024 * 1024)
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Describe"}]}]

    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    assert response.status_code == 200


# --- errors before the model runs ---------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer sk-wrong"}, id="wrong-key"),
        pytest.param({"Authorization": DEMO_KEY}, id="no-bearer"),
    ],
)
def test_bad_key_is_401(sim: SimulatorThread, headers: dict[str, str]) -> None:
    before = sim.stats.outcomes["auth_401"]
    with httpx.Client(base_url=sim.base_url, headers=headers) as http:
        response = http.post(TEXT, json=text_body())

    assert_error(response, 401, "InvalidApiKey", "Invalid API-key provided.")
    assert sim.stats.outcomes["auth_401"] == before + 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("POST", "/services/aigc/text-generation/other", id="other-path"),
        pytest.param("GET", TEXT, id="get-on-generation"),
        # The OpenAI-compatible route lives at the host root, not under /api/v1.
        pytest.param("POST", "/compatible-mode/v1/chat/completions", id="compatible-mode-under-api-v1"),
    ],
)
def test_unknown_route_is_404(client: httpx.Client, method: str, path: str) -> None:
    assert_error(client.request(method, path, json={}), 404, "NotFound", "Not Found")


EMPTY_MODEL = "Required parameter(s) missing or invalid, please check the request parameters."
EMPTY_INPUT = "Required input parameter missing from request."


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        pytest.param(b"{not json", "InvalidParameter", "The request body is not valid JSON.", id="not-json"),
        pytest.param(
            b"[1, 2]", "InvalidParameter", "The request body should be a JSON object.", id="not-object"
        ),
        pytest.param({"input": {"messages": HI}}, "BadRequest.EmptyModel", EMPTY_MODEL, id="no-model"),
        pytest.param(text_body(model=""), "BadRequest.EmptyModel", EMPTY_MODEL, id="empty-model"),
        pytest.param({"model": "qwen-plus"}, "BadRequest.EmptyInput", EMPTY_INPUT, id="no-input"),
        pytest.param(text_body(messages=[]), "BadRequest.EmptyInput", EMPTY_INPUT, id="no-messages"),
        pytest.param(
            text_body(messages=[{"role": "robot", "content": "hi"}]),
            "InvalidParameter",
            "Role must be in [system, user, assistant, tool].",
            id="bad-role",
        ),
        pytest.param(
            text_body(messages=[{"content": "hi"}]),
            "InvalidParameter",
            "Role must be in [system, user, assistant, tool].",
            id="no-role",
        ),
        pytest.param(
            text_body(messages=[{"role": "user"}]),
            "InvalidParameter",
            "Content of a message must not be empty.",
            id="no-content",
        ),
        pytest.param(
            text_body(messages=[{"role": "user", "content": 42}]),
            "InvalidParameter",
            "Content of a message should be a string or a list of parts.",
            id="content-not-text",
        ),
        pytest.param(
            text_body(temperature=2.0),
            "InvalidParameter",
            "Range of temperature should be [0.0, 2.0)",
            id="temperature",
        ),
        pytest.param(
            text_body(top_p=0), "InvalidParameter", "Range of top_p should be (0.0, 1.0]", id="top_p"
        ),
        pytest.param(
            text_body(top_k=-1),
            "InvalidParameter",
            "Parameter top_k should be an integer >= 0",
            id="top_k",
        ),
        pytest.param(
            text_body(max_tokens=0),
            "InvalidParameter",
            "Parameter max_tokens should be an integer >= 1",
            id="max_tokens",
        ),
        pytest.param(
            text_body(seed=2**31),
            "InvalidParameter",
            "Range of seed should be [0, 2147483647]",
            id="seed",
        ),
        pytest.param(text_body(n=5), "InvalidParameter", "Range of n should be [1, 4]", id="n"),
        pytest.param(
            text_body(presence_penalty=-2.5),
            "InvalidParameter",
            "Range of presence_penalty should be [-2.0, 2.0]",
            id="presence_penalty",
        ),
        pytest.param(
            text_body(thinking_budget=0),
            "InvalidParameter",
            "Parameter thinking_budget should be a positive integer",
            id="thinking_budget",
        ),
        pytest.param(
            text_body(enable_thinking="yes"),
            "InvalidParameter",
            "Parameter enable_thinking should be a boolean",
            id="enable_thinking",
        ),
        pytest.param(
            text_body(stop=["ok", 3]),
            "InvalidParameter",
            "Parameter stop should be a string or a list of strings",
            id="stop",
        ),
    ],
)
def test_invalid_request_is_400(
    sim: SimulatorThread, client: httpx.Client, body: Any, code: str, message: str
) -> None:
    before = sim.stats.outcomes["bad_request_400"]
    if isinstance(body, bytes):
        response = client.post(TEXT, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(TEXT, json=body)

    assert_error(response, 400, code, message)
    assert sim.stats.outcomes["bad_request_400"] == before + 1


def test_valid_parameters_and_unknown_ones_are_accepted(client: httpx.Client) -> None:
    body = text_body(
        temperature=0,
        top_p=1,
        top_k=0,
        max_tokens=1,
        seed=2**31 - 1,
        n=4,
        presence_penalty=2,
        thinking_budget=1,
        enable_thinking=False,
        stop="END",
        some_future_parameter={"x": 1},
    )
    assert client.post(TEXT, json=body).status_code == 200


@pytest.mark.parametrize(
    "model",
    ["qwen-plus", "qwen-max-latest", "qwen-turbo", "qwen-flash", "qwen-long", "qwen3-max",
     "qwen3-coder-plus", "qwen2.5-72b-instruct", "batch-test-model"],
)  # fmt: skip
def test_known_text_models_answer(client: httpx.Client, model: str) -> None:
    assert client.post(TEXT, json=text_body(model=model)).status_code == 200


@pytest.mark.parametrize(
    ("model", "parameters"),
    [
        pytest.param("qwq-plus", {"incremental_output": True}, id="qwq-streamed"),
        pytest.param("qwen3-8b", {"enable_thinking": False}, id="qwen3-8b-not-thinking"),
        pytest.param("qwen3-235b-a22b", {"incremental_output": True}, id="qwen3-235b-streamed"),
    ],
)
def test_known_text_models_that_stream_answer_when_called_their_way(
    client: httpx.Client, model: str, parameters: dict[str, Any]
) -> None:
    headers = SSE if parameters.get("incremental_output") else {}
    response = client.post(TEXT, json=text_body(model=model, **parameters), headers=headers)

    assert response.status_code == 200
    assert "event:error" not in response.text


@pytest.mark.parametrize(
    "model",
    ["qwen3.5-plus", "qwen3.6-plus", "qwen3.7-flash", "qwen-vl-max", "qwen3-vl-plus",
     "qwen-omni-turbo", "qwen3-omni-flash"],
)  # fmt: skip
def test_multimodal_models_answer_on_their_route_only(client: httpx.Client, model: str) -> None:
    parts = [{"role": "user", "content": [{"text": "Hi"}]}]
    headers = SSE if "omni" in model else {}  # omni models answer streamed calls only
    multimodal = client.post(MULTIMODAL, json={"model": model, "input": {"messages": parts}}, headers=headers)
    text = client.post(TEXT, json=text_body(model=model))

    assert multimodal.status_code == 200
    assert "event:error" not in multimodal.text
    assert_error(text, 400, "InvalidParameter", "url error, please check url！")


def test_text_model_on_multimodal_route_is_url_error(client: httpx.Client) -> None:
    parts = [{"role": "user", "content": [{"text": "Hi"}]}]
    response = client.post(MULTIMODAL, json={"model": "qwen-plus", "input": {"messages": parts}})

    assert_error(response, 400, "InvalidParameter", "url error, please check url！")


def test_multimodal_route_requires_parts(client: httpx.Client) -> None:
    response = client.post(MULTIMODAL, json={"model": "qwen3.5-plus", "input": {"messages": HI}})

    assert_error(
        response,
        400,
        "InvalidParameter",
        'Content of every message should be a list of parts, e.g. [{"text": "..."}].',
    )


@pytest.mark.parametrize("model", ["gpt-4o", "Qwen-Plus", "qwen3-next", "batch-test-model-2"])
def test_unknown_model_does_not_exist(client: httpx.Client, model: str) -> None:
    assert_error(client.post(TEXT, json=text_body(model=model)), 400, "InvalidParameter", "Model not exist.")


@pytest.mark.parametrize(
    ("marker", "status", "code", "message"),
    [
        ("DataInspectionFailed", 400, "DataInspectionFailed",
         "Input data may contain inappropriate content."),
        ("Arrearage", 400, "Arrearage",
         "Access denied, please make sure your account is in good standing."),
        ("AccessDenied", 403, "AccessDenied", "Access denied."),
        ("FreeTierOnly", 403, "AllocationQuota.FreeTierOnly",
         "The free tier of the model has been exhausted. If you wish to continue access the model"
         ' on a paid basis, please disable the "use free tier only" mode in the management'
         " console."),
        ("FreeQuotaExceeded", 429, "Throttling.AllocationQuota", "Free allocated quota exceeded."),
        ("TooLarge", 413, "BadRequest.TooLarge", "Request body too large."),
        ("InvalidParameter", 400, "InvalidParameter", "The parameter is invalid."),
        ("InternalError", 500, "InternalError",
         "An internal error has occured, please try again later or contact service support."),
    ],
)  # fmt: skip
def test_markers_answer_their_error(
    sim: SimulatorThread, client: httpx.Client, marker: str, status: int, code: str, message: str
) -> None:
    before = sim.stats.outcomes[f"error:{code}"]
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": f"a [sim:{marker}] b"}]

    response = client.post(TEXT, json=text_body(messages=messages))

    assert_error(response, status, code, message)
    assert sim.stats.outcomes[f"error:{code}"] == before + 1
    assert response.json()["request_id"] not in sim.stats.served


def test_unknown_marker_is_an_ordinary_prompt(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": "[sim:Nonsense]"}]
    assert client.post(TEXT, json=text_body(messages=messages)).status_code == 200


# --- replies ------------------------------------------------------------------------------


def test_max_tokens_cuts_the_reply(client: httpx.Client) -> None:
    full = simulated_reply("qwen-plus", HI)

    body = client.post(TEXT, json=text_body(max_tokens=5)).json()

    choice = body["output"]["choices"][0]
    assert choice["finish_reason"] == "length"
    assert full.content.startswith(choice["message"]["content"])
    assert count_tokens(choice["message"]["content"]) == 5
    assert body["usage"]["output_tokens"] == 5


def test_max_tokens_larger_than_the_reply_changes_nothing() -> None:
    full = simulated_reply("qwen-plus", HI)
    assert simulated_reply("qwen-plus", HI, max_tokens=full.output_tokens) == full


def test_thinking_adds_reasoning_billed_as_output(client: httpx.Client) -> None:
    body = client.post(TEXT, json=text_body(enable_thinking=True)).json()

    message = body["output"]["choices"][0]["message"]
    reasoning_tokens = body["usage"]["output_tokens_details"]["reasoning_tokens"]
    assert message["reasoning_content"].startswith('Let me think about "Hi there". ')
    assert reasoning_tokens == count_tokens(message["reasoning_content"]) > 0
    assert body["usage"]["output_tokens"] == count_tokens(message["content"]) + reasoning_tokens
    assert message["content"] == simulated_reply("qwen-plus", HI).content


def test_thinking_budget_caps_reasoning_and_max_tokens_only_the_answer() -> None:
    reply = simulated_reply("qwen-plus", HI, enable_thinking=True, thinking_budget=7, max_tokens=3)

    assert reply.reasoning is not None
    assert reply.reasoning_tokens == count_tokens(reply.reasoning) == 7
    assert count_tokens(reply.content) == 3
    assert reply.finish_reason == "length"
    assert reply.output_tokens == 10


def test_qwq_always_thinks_and_others_do_not_by_default() -> None:
    assert simulated_reply("qwq-plus", HI).reasoning_tokens > 0
    plain = simulated_reply("qwen-plus", HI)
    assert (plain.reasoning, plain.reasoning_tokens) == (None, 0)


def test_simulated_reply_is_deterministic_and_quotes_the_last_user_message() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Summarise   the\nhistory of tea " + "in great detail " * 10},
        {"role": "assistant", "content": "Sure."},
    ]
    first = simulated_reply("qwen-max", messages)

    assert simulated_reply("qwen-max", messages) == first
    assert simulated_reply("qwen-turbo", messages) != first
    assert first.content.startswith('Qwen (simulated) on "Summarise the history of tea in great')
    assert first.content.endswith(".")
    words = first.content.split('": ', 1)[1].split()
    assert 8 <= len(words) <= 60
    assert first.input_tokens == sum(count_tokens(m["content"]) + 4 for m in messages) + 3


def test_simulated_reply_does_not_depend_on_the_process() -> None:
    """Python's hash() changes per process; a resumed run must still get the same replies."""
    code = (
        "import json; from batchgen.simulator import simulated_reply; "
        "r = simulated_reply('qwen-plus', [{'role': 'user', 'content': 'Hi there'}]); "
        "print(json.dumps([r.content, r.output_tokens]))"
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = simulated_reply("qwen-plus", HI)
    assert json.loads(result.stdout) == [here.content, here.output_tokens]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        pytest.param("", 0, id="empty"),
        pytest.param("a", 1, id="one-char"),
        pytest.param("abcd", 1, id="four-bytes"),
        pytest.param("abcde", 2, id="five-bytes"),
        pytest.param("é", 1, id="two-byte-char"),
        pytest.param("你好世界", 4, id="chinese"),
        pytest.param("こんにちは", 5, id="kana"),
        pytest.param("안녕", 2, id="hangul"),
        pytest.param("hi 你好", 3, id="mixed"),
    ],
)
def test_count_tokens(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


# --- quota --------------------------------------------------------------------------------


def test_token_bucket_enforces_rpm_per_second() -> None:
    bucket = TokenBucket(600, now=0.0)  # 10 per second, capacity 10

    assert [bucket.try_take(0.0) for _ in range(11)] == [True] * 10 + [False]
    assert bucket.try_take(0.05) is False  # half a token back, and the refusal took none
    assert bucket.try_take(0.1) is True
    assert sum(bucket.try_take(100.0) for _ in range(20)) == 10  # never more than capacity


def test_token_bucket_below_60_rpm_holds_one_request() -> None:
    bucket = TokenBucket(30, now=0.0)  # one request per 2 s

    assert [bucket.try_take(0.0), bucket.try_take(1.9), bucket.try_take(2.0)] == [True, False, True]


def test_rpm_quota_throttles_a_burst_over_http() -> None:
    with (
        SimulatorThread(SimulatorConfig(rpm=600)) as simulator,
        httpx.Client(base_url=simulator.base_url, headers=AUTH) as http,
    ):
        responses = [http.post(TEXT, json=text_body()) for _ in range(30)]

    ok = [r for r in responses if r.status_code == 200]
    throttled = [r for r in responses if r.status_code == 429]
    assert 10 <= len(ok) <= 15  # 10 at once, plus whatever refilled during the burst
    assert len(ok) + len(throttled) == 30
    assert_error(
        throttled[0],
        429,
        "Throttling.RateQuota",
        "Requests rate limit exceeded, please try again later.",
    )
    assert simulator.stats.outcomes == {"ok": len(ok), "quota_429": len(throttled)}
    assert simulator.stats.requests == len(simulator.stats.arrivals) == 30


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code", "message"),
    [
        ("fault_429", 429, "Throttling.RateQuota",
         "Requests rate limit exceeded, please try again later."),
        ("fault_500", 500, "InternalError",
         "An internal error has occured, please try again later or contact service support."),
        ("fault_200_error", 200, "InternalError.Algo",
         "An error occurred in model serving, error message is: [Internal server error!]"),
    ],
)  # fmt: skip
def test_error_faults(fault: str, status: int, code: str, message: str) -> None:
    response, stats = post_with(SimulatorConfig(**{fault: 1.0}), text_body())

    assert_error(response, status, code, message)
    assert stats.outcomes == {fault: 1}
    assert stats.served == {}


def test_drop_fault_closes_the_connection_without_a_response() -> None:
    error, stats = post_with(SimulatorConfig(fault_drop=1.0), text_body())

    assert isinstance(error, httpx.RemoteProtocolError)
    assert "without sending a response" in str(error)
    assert stats.outcomes == {"fault_drop": 1}


def test_truncate_fault_sends_half_the_promised_body() -> None:
    with SimulatorThread(SimulatorConfig(fault_truncate=1.0)) as simulator:
        host, port = httpx.URL(simulator.base_url).host, httpx.URL(simulator.base_url).port
        payload = json.dumps(text_body()).encode()
        request = (
            f"POST /api/v1{TEXT} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {DEMO_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(65536):  # ends when the server closes the connection
                received += chunk
        with (
            httpx.Client(base_url=simulator.base_url, headers=AUTH) as http,
            pytest.raises(httpx.RemoteProtocolError, match="complete message body"),
        ):
            http.post(TEXT, json=text_body())

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    assert len(body) == length // 2 > 0
    assert body.startswith(b'{"output":')
    assert simulator.stats.outcomes == {"fault_truncate": 2}
    assert simulator.stats.served == {}


def test_hang_fault_outlasts_the_client_timeout() -> None:
    config = SimulatorConfig(fault_hang=1.0, hang_seconds=5.0)
    started = time.monotonic()

    error, stats = post_with(config, text_body(), timeout=0.3)

    assert isinstance(error, httpx.ReadTimeout)
    assert stats.outcomes == {"fault_hang": 1}
    assert time.monotonic() - started < 3  # stop() did not wait out the hang


def test_hang_fault_then_answers_normally() -> None:
    started = time.monotonic()
    response, stats = post_with(SimulatorConfig(fault_hang=1.0, hang_seconds=0.2), text_body())

    assert time.monotonic() - started >= 0.2
    assert response.status_code == 200
    assert stats.outcomes == {"fault_hang": 1, "ok": 1}
    assert list(stats.served.values()) == [simulated_reply("qwen-plus", HI).content]


def test_latency_delays_the_answer() -> None:
    started = time.monotonic()
    response, _ = post_with(SimulatorConfig(latency=0.2, jitter=0.05), text_body())

    assert 0.15 <= time.monotonic() - started < 5
    assert response.status_code == 200


def test_seed_makes_fault_draws_repeatable() -> None:
    def outcomes() -> list[int]:
        with (
            SimulatorThread(SimulatorConfig(fault_500=0.5, seed=7)) as simulator,
            httpx.Client(base_url=simulator.base_url, headers=AUTH) as http,
        ):
            return [http.post(TEXT, json=text_body()).status_code for _ in range(20)]

    first = outcomes()
    assert first == outcomes()
    assert set(first) == {200, 500}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"fault_500": 0.6, "fault_429": 0.6}, id="sum-over-1"),
        pytest.param({"fault_drop": -0.1}, id="negative"),
        pytest.param({"rpm": 0}, id="rpm-0"),
        pytest.param({"latency": -1.0}, id="negative-latency"),
        pytest.param({"key": ""}, id="empty-key"),
    ],
)
def test_config_rejects_nonsense(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatorConfig(**options)


# --- lifecycle ----------------------------------------------------------------------------


def test_stop_does_not_wait_for_a_hanging_request() -> None:
    simulator = SimulatorThread(SimulatorConfig(fault_hang=1.0))  # hangs 600 s
    simulator.start()
    errors: list[Exception] = []

    def call() -> None:
        with httpx.Client(base_url=simulator.base_url, headers=AUTH, timeout=60) as http:
            try:
                http.post(TEXT, json=text_body())
            except httpx.HTTPError as error:
                errors.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while simulator.stats.outcomes["fault_hang"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()

    simulator.stop()

    assert time.monotonic() - started < 2
    caller.join(timeout=5)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], httpx.TransportError)


def test_async_simulator_start_and_stop() -> None:
    async def scenario() -> tuple[str, float]:
        simulator = Simulator(SimulatorConfig(fault_hang=1.0))  # hangs 600 s
        base_url = await simulator.start()
        try:
            async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60) as http:
                hanging = asyncio.create_task(http.post(TEXT, json=text_body()))
                while simulator.stats.outcomes["fault_hang"] == 0:
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                await simulator.stop()
                elapsed = time.monotonic() - started
                with pytest.raises(httpx.TransportError):
                    await hanging
        finally:
            await simulator.stop()  # a second stop is harmless
        return base_url, elapsed

    base_url, stop_seconds = asyncio.run(scenario())

    host, _, rest = base_url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    assert (host, path) == ("127.0.0.1", "api/v1")
    assert int(port) > 0
    assert stop_seconds < 2


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


RATE = "Requests rate limit exceeded, please try again later."


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
        except httpx.RemoteProtocolError as caught:
            error = caught

    assert error is not None and "without sending a response" in str(error)
    assert simulator.stats.streamed == 0


OUTPUT_INSPECTION = "Output data may contain inappropriate content."
INSPECTED = [{"role": "user", "content": "Tell me [sim:OutputInspection] things"}]


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

STREAM_ONLY = "This model only support stream mode, please enable the stream parameter to access the model."
THINKING_STREAM_ONLY = (
    # The real wording, as users of the service report it.
    "parameter.enable_thinking must be set to false for non-streaming calls"
)


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


# --- images -----------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n pretend pixels"
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
CAT_URL = "https://example.com/cat.png"


def test_image_id_hashes_the_decoded_bytes_or_the_url() -> None:
    assert image_id(PNG_URI) == hashlib.sha256(PNG).hexdigest()[:8]
    assert image_id(PNG_URI.replace("image/png", "image/jpeg")) == image_id(PNG_URI)
    assert image_id(CAT_URL) == hashlib.sha256(CAT_URL.encode()).hexdigest()[:8]
    assert len({image_id(PNG_URI), image_id(CAT_URL)}) == 2


def test_images_are_billed_and_named_in_the_reply(sim: SimulatorThread, client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": [{"text": "Be brief."}]},
        {"role": "user", "content": [{"image": CAT_URL}, {"image": PNG_URI}, {"text": "What is this?"}]},
    ]
    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    data = response.json()
    content = data["output"]["choices"][0]["message"]["content"][0]["text"]
    assert content.startswith(
        f'Qwen (simulated) on "What is this?" [2 images: {image_id(CAT_URL)}, {image_id(PNG_URI)}]: '
    )
    text_tokens = count_tokens("Be brief.") + 4 + count_tokens("What is this?") + 4 + 3
    assert data["usage"]["input_tokens"] == text_tokens + 2 * IMAGE_TOKENS
    assert data["usage"]["image_tokens"] == 2 * IMAGE_TOKENS
    assert data["usage"]["input_tokens_details"] == {
        "text_tokens": text_tokens,
        "image_tokens": 2 * IMAGE_TOKENS,
    }
    expected = simulated_reply("qwen-vl-max", messages)
    assert (content, expected.image_tokens) == (expected.content, 2 * IMAGE_TOKENS)
    assert expected.image_ids == (image_id(CAT_URL), image_id(PNG_URI))


@pytest.mark.parametrize(
    "image",
    [
        "data:image/jpeg;base64,/9j/4AAQ",
        "data:image/webp;base64,UklGRg==",
        "data:image/gif;base64,R0lGODlh",
        "data:image/bmp;base64,Qk0=",
        "data:image/tiff;base64,SUkqAA==",
        "data:image/heic;base64,AAAA",
        "DATA:IMAGE/PNG;BASE64,iVBORw0KGgo=",
        "http://example.com/a.jpg",
        "HTTPS://example.com/a?b=c",
    ],
)
def test_supported_images_are_accepted(client: httpx.Client, image: str) -> None:
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Hi"}]}]
    response = client.post(MULTIMODAL, json={"model": "qwen3-vl-plus", "input": {"messages": messages}})

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("image", "message"),
    [
        pytest.param("file:///home/me/cat.png", "cannot read local files or paths", id="file-url"),
        pytest.param("/home/me/cat.png", "cannot read local files or paths", id="bare-path"),
        pytest.param("cat.png", "cannot read local files or paths", id="relative-path"),
        pytest.param(
            "data:image/png;base64,not base64!",
            "base64 data of an image data URI is invalid",
            id="bad-base64",
        ),
        pytest.param(
            "data:image/png;base64,", "base64 data of an image data URI is invalid", id="empty-base64"
        ),
        pytest.param(
            "data:text/plain;base64,aGk=", "Unsupported image MIME type 'text/plain'", id="not-image"
        ),
        pytest.param(
            "data:image/svg+xml;base64,PHN2Zz4=", "Unsupported image MIME type 'image/svg+xml'", id="svg"
        ),
        pytest.param("data:image/png,rawbytes", "must be base64-encoded", id="not-base64-encoded"),
        pytest.param(42, "should be a non-empty string", id="not-a-string"),
        pytest.param("", "should be a non-empty string", id="empty"),
    ],
)
def test_bad_images_are_400(client: httpx.Client, image: Any, message: str) -> None:
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Hi"}]}]
    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    assert response.status_code == 400
    assert response.json()["code"] == "InvalidParameter"
    assert message in response.json()["message"]


def test_video_and_audio_parts_are_accepted_and_ignored(client: httpx.Client) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"video": "https://example.com/v.mp4"},
                {"audio": "https://example.com/a.mp3"},
                {"text": "Hi"},
            ],
        }
    ]
    response = client.post(MULTIMODAL, json={"model": "qwen3.5-plus", "input": {"messages": messages}})

    data = response.json()
    expected = simulated_reply("qwen3.5-plus", messages)
    assert data["output"]["choices"][0]["message"]["content"] == [{"text": expected.content}]
    assert expected.content.startswith('Qwen (simulated) on "Hi": ')
    assert data["usage"]["input_tokens_details"] == {"text_tokens": expected.input_tokens}


def test_an_image_on_the_text_route_is_400(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": [{"image": CAT_URL}, {"text": "Hi"}]}]
    response = client.post(TEXT, json=text_body(messages=messages))

    assert_error(
        response,
        400,
        "InvalidParameter",
        "Image input is not supported on the text-generation route; send images to a vision model on the "
        "multimodal-generation route.",
    )


MIB = 1024 * 1024


def test_a_body_over_16_mib_without_base64_is_too_large(client: httpx.Client) -> None:
    body = text_body(messages=[{"role": "user", "content": "a" * (16 * MIB)}])

    assert_error(client.post(TEXT, json=body), 413, "BadRequest.TooLarge", "Request body too large.")


def test_a_body_over_16_mib_with_a_base64_image_is_accepted(client: httpx.Client) -> None:
    image = "data:image/png;base64," + "A" * (17 * MIB)
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Describe"}]}]

    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    assert response.status_code == 200
    content = response.json()["output"]["choices"][0]["message"]["content"][0]["text"]
    assert f"[1 image: {hashlib.sha256(bytes(17 * MIB * 3 // 4)).hexdigest()[:8]}]" in content


def test_a_body_over_64_mib_is_too_large(client: httpx.Client) -> None:
    image = "data:image/png;base64," + "A" * (64 * MIB)
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Describe"}]}]

    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    assert_error(response, 413, "BadRequest.TooLarge", "Request body too large.")


# --- JSON replies -----------------------------------------------------------------------------

JSON_OBJECT = {"type": "json_object"}
ASK_JSON = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Name a colour"}]


def test_json_object_needs_the_word_json(client: httpx.Client) -> None:
    response = client.post(TEXT, json=text_body(response_format=JSON_OBJECT))

    assert_error(
        response,
        400,
        "InvalidParameter",
        "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
        "'json_object'.",
    )


def test_json_object_reply_is_a_compact_json_object(client: httpx.Client) -> None:
    body = text_body(messages=ASK_JSON, response_format=JSON_OBJECT)
    content = client.post(TEXT, json=body).json()["output"]["choices"][0]["message"]["content"]

    document = json.loads(content)
    assert list(document) == ["prompt", "answer"]
    assert document["prompt"] == "Name a colour"
    assert document["answer"] and document["answer"].endswith(".")
    assert content == json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    assert content == reply_of(body).content


def test_json_object_reply_names_the_images(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": [{"image": CAT_URL}, {"text": "Describe it as json"}]}]
    body = {
        "model": "qwen3.5-plus",
        "input": {"messages": messages},
        "parameters": {"response_format": JSON_OBJECT},
    }
    content = client.post(MULTIMODAL, json=body).json()["output"]["choices"][0]["message"]["content"][0][
        "text"
    ]

    assert json.loads(content)["images"] == [image_id(CAT_URL)]


SCHEMAS = [
    pytest.param(
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        id="flat",
    ),
    pytest.param(
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3},
                "score": {"type": "number", "minimum": 0.5, "maximum": 0.75},
                "count": {"type": "integer", "minimum": 10, "maximum": 12},
                "ok": {"type": "boolean"},
                "mood": {"enum": ["happy", "sad", 3]},
                "kind": {"const": "fixed"},
                "nested": {
                    "type": "object",
                    "properties": {
                        "deep": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"x": {"type": ["null", "integer"]}},
                                "required": ["x"],
                            },
                        }
                    },
                },
                "short": {"type": "string", "maxLength": 4, "minLength": 2},
                "long": {"type": "string", "minLength": 200},
                "nothing": {"type": "null"},
                "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            },
            "required": ["tags", "score", "count", "ok", "mood", "kind", "nested", "extra"],
        },
        id="rich",
    ),
    pytest.param(
        {"type": "array", "items": {"type": "integer"}, "minItems": 5, "maxItems": 5}, id="array-root"
    ),
    pytest.param({"type": "string", "format": "email", "x-unknown": 1}, id="string-root"),
    pytest.param({}, id="empty-schema"),
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_reply_is_valid_against_the_schema(client: httpx.Client, schema: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    body = text_body(response_format=response_format)

    content = client.post(TEXT, json=body).json()["output"]["choices"][0]["message"]["content"]

    jsonschema.validate(json.loads(content), schema)
    assert content == reply_of(body).content
    assert content == json.dumps(json.loads(content), separators=(",", ":"), ensure_ascii=False)


def test_json_schema_values_depend_on_the_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    first = json.loads(simulated_reply("qwen-plus", HI, response_format=response_format).content)
    other = json.loads(simulated_reply("qwen-max", HI, response_format=response_format).content)

    assert first["a"] != first["b"]
    assert first != other


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        pytest.param(
            {"type": "xml"},
            "Unsupported response_format type 'xml'; expected text, json_object or json_schema.",
            id="unknown-type",
        ),
        pytest.param(
            "json",
            "Parameter response_format should be an object with a type: text, json_object or json_schema.",
            id="not-an-object",
        ),
        pytest.param(
            {},
            "Parameter response_format should be an object with a type: text, json_object or json_schema.",
            id="no-type",
        ),
        pytest.param(
            {"type": "json_schema"},
            "Parameter response_format.json_schema should be an object with a name and a schema.",
            id="no-json-schema",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"schema": {}}},
            "Parameter response_format.json_schema.name should be 1 to 64 letters, digits, '_' or '-'.",
            id="no-name",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
            "Parameter response_format.json_schema.name should be 1 to 64 letters, digits, '_' or '-'.",
            id="bad-name",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "a"}},
            "Parameter response_format.json_schema.schema is missing.",
            id="no-schema",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "a", "schema": []}},
            "Invalid JSON schema in response_format.json_schema: schema should be an object.",
            id="schema-not-object",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "text"}}},
            "Invalid JSON schema in response_format.json_schema: schema.type 'text' is not one of "
            "array, boolean, integer, null, number, object, string.",
            id="unknown-schema-type",
        ),
        pytest.param(
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "a",
                    "schema": {"type": "object", "properties": {"x": {"type": "array", "items": 3}}},
                },
            },
            "Invalid JSON schema in response_format.json_schema: schema.properties.x.items should be "
            "an object.",
            id="nested-problem",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": []}}},
            "Invalid JSON schema in response_format.json_schema: schema.enum should be a non-empty list.",
            id="empty-enum",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}},
            "Parameter response_format.json_schema.strict should be a boolean.",
            id="bad-strict",
        ),
    ],
)
def test_invalid_response_format_is_400(client: httpx.Client, response_format: Any, message: str) -> None:
    response = client.post(TEXT, json=text_body(messages=ASK_JSON, response_format=response_format))

    assert_error(response, 400, "InvalidParameter", message)


def test_response_format_text_is_the_ordinary_reply(client: httpx.Client) -> None:
    body = text_body(response_format={"type": "text"})
    content = client.post(TEXT, json=body).json()["output"]["choices"][0]["message"]["content"]

    assert content == simulated_reply("qwen-plus", HI).content


BAD_JSON = [{"role": "user", "content": "Reply in json [sim:BadJson]"}]
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}},
}


@pytest.mark.parametrize(
    ("messages", "parameters"),
    [
        pytest.param(BAD_JSON, {"response_format": JSON_OBJECT}, id="bad-json-object"),
        pytest.param(BAD_JSON, {"response_format": SCHEMA_FORMAT}, id="bad-json-schema"),
        pytest.param(ASK_JSON, {"response_format": JSON_OBJECT, "max_tokens": 6}, id="cut-json-object"),
        pytest.param(ASK_JSON, {"response_format": SCHEMA_FORMAT, "max_tokens": 4}, id="cut-json-schema"),
    ],
)
def test_broken_json_replies_streamed_or_not(client: httpx.Client, messages: list, parameters: dict) -> None:
    body = text_body(messages=messages, **parameters)
    plain = client.post(TEXT, json=body).json()["output"]["choices"][0]
    streamed_body = text_body(messages=messages, incremental_output=True, **parameters)
    content, _, finish_reason, _ = joined(native_events(client.post(TEXT, json=streamed_body, headers=SSE)))

    assert content == plain["message"]["content"] == reply_of(body).content
    assert finish_reason == plain["finish_reason"] == ("length" if "max_tokens" in parameters else "stop")
    with pytest.raises(ValueError):
        json.loads(content)


def test_bad_json_marker_outside_json_mode_is_an_ordinary_prompt(client: httpx.Client) -> None:
    response = client.post(TEXT, json=text_body(messages=BAD_JSON))

    assert (
        response.json()["output"]["choices"][0]["message"]["content"]
        == simulated_reply("qwen-plus", BAD_JSON).content
    )


# --- the OpenAI-compatible route ------------------------------------------------------------


@pytest.fixture()
def compat(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.compatible_base_url, headers=AUTH, timeout=10) as http:
        yield http


def chat_body(model: str = "qwen-plus", messages: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI if messages is None else messages, **extra}


def test_compatible_base_url_is_beside_api_v1(sim: SimulatorThread) -> None:
    assert sim.compatible_base_url == sim.base_url.removesuffix("/api/v1") + "/compatible-mode/v1"


def test_openai_success_shape(sim: SimulatorThread, compat: httpx.Client) -> None:
    before = sim.stats.routes["openai"]
    response = compat.post(
        CHAT,
        json=chat_body(
            temperature=0.5,
            top_p=0.9,
            seed=3,
            n=1,
            top_k=5,
            repetition_penalty=1.1,
            presence_penalty=0.1,
            stop=["X"],
        ),
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    request_id = response.headers["x-request-id"]
    expected = simulated_reply("qwen-plus", HI)
    assert isinstance(body.pop("created"), int)
    assert body == {
        "choices": [
            {
                "message": {"role": "assistant", "content": expected.content},
                "finish_reason": "stop",
                "index": 0,
                "logprobs": None,
            }
        ],
        "object": "chat.completion",
        "usage": {
            "prompt_tokens": expected.input_tokens,
            "completion_tokens": expected.output_tokens,
            "total_tokens": expected.total_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
        "system_fingerprint": None,
        "model": "qwen-plus",
        "id": f"chatcmpl-{request_id}",
    }
    assert sim.stats.served[request_id] == expected.content
    assert sim.stats.routes["openai"] == before + 1


def test_openai_thinking_reply(compat: httpx.Client) -> None:
    body = compat.post(CHAT, json=chat_body(enable_thinking=True, thinking_budget=30, max_tokens=5)).json()

    expected = simulated_reply("qwen-plus", HI, enable_thinking=True, thinking_budget=30, max_tokens=5)
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": expected.content,
        "reasoning_content": expected.reasoning,
    }
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == expected.output_tokens
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": expected.reasoning_tokens}


def test_openai_route_takes_any_model(compat: httpx.Client) -> None:
    for model in ("qwen-plus", "qwen3.5-plus", "qwen-vl-max", "batch-test-model"):
        response = compat.post(CHAT, json=chat_body(model=model))
        assert response.status_code == 200, (model, response.text)
        assert response.json()["choices"][0]["message"]["content"] == simulated_reply(model, HI).content


def test_openai_parts_get_the_reply_of_the_native_parts(client: httpx.Client, compat: httpx.Client) -> None:
    openai_messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": PNG_URI}},
                {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    native_messages = [
        {
            "role": "user",
            "content": [{"image": PNG_URI}, {"video": "https://example.com/v.mp4"}, {"text": "What is it?"}],
        }
    ]

    openai = compat.post(CHAT, json=chat_body(model="qwen3-vl-plus", messages=openai_messages)).json()
    native = client.post(
        MULTIMODAL, json={"model": "qwen3-vl-plus", "input": {"messages": native_messages}}
    ).json()

    assert (
        openai["choices"][0]["message"]["content"]
        == native["output"]["choices"][0]["message"]["content"][0]["text"]
    )
    assert f"[1 image: {image_id(PNG_URI)}]" in openai["choices"][0]["message"]["content"]
    assert openai["usage"]["prompt_tokens"] == native["usage"]["input_tokens"]
    assert openai["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0,
        "text_tokens": native["usage"]["input_tokens"] - IMAGE_TOKENS,
        "image_tokens": IMAGE_TOKENS,
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            chat_body(
                model="qwen-plus",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": CAT_URL}},
                            {"type": "text", "text": "Hi"},
                        ],
                    }
                ],
            ),
            "The model qwen-plus does not support image input.",
            id="image-for-a-text-model",
        ),
        pytest.param(
            chat_body(
                model="qwen-vl-max",
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "file:///cat.png"}}],
                    }
                ],
            ),
            "Invalid image 'file:///cat.png': images must be http(s) URLs or "
            "data:image/<format>;base64,<data> URIs; the service cannot read local files or paths.",
            id="file-image",
        ),
        pytest.param(
            chat_body(messages=[{"role": "user", "content": [{"type": "audio_file", "x": 1}]}]),
            "Unsupported content part type 'audio_file'; expected text, image_url, video_url, video or "
            "input_audio.",
            id="unknown-part",
        ),
        pytest.param(
            chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
            "A text content part should have a string text.",
            id="text-not-string",
        ),
        pytest.param(chat_body(temperature=3), "Range of temperature should be [0.0, 2.0)", id="temperature"),
        pytest.param(
            chat_body(max_tokens=0), "Parameter max_tokens should be an integer >= 1", id="max_tokens"
        ),
        pytest.param(
            chat_body(enable_thinking="on"),
            "Parameter enable_thinking should be a boolean",
            id="enable_thinking",
        ),
        pytest.param(chat_body(stream="yes"), "Parameter stream should be a boolean", id="stream"),
        pytest.param(
            chat_body(stream=True, stream_options={"include_usage": 1}),
            "Parameter stream_options.include_usage should be a boolean",
            id="include_usage",
        ),
        pytest.param(
            chat_body(response_format={"type": "json_object"}),
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
            "'json_object'.",
            id="json-word",
        ),
        pytest.param({"messages": HI}, EMPTY_MODEL, id="no-model"),
        pytest.param({"model": "qwen-plus", "messages": []}, EMPTY_INPUT, id="no-messages"),
        pytest.param(
            chat_body(messages=[{"role": "robot", "content": "x"}]),
            "Role must be in [system, user, assistant, tool].",
            id="bad-role",
        ),
        pytest.param(chat_body(model="qwq-plus"), STREAM_ONLY, id="qwq-not-streamed"),
        pytest.param(chat_body(model="qwen3-8b"), THINKING_STREAM_ONLY, id="qwen3-thinking-not-streamed"),
    ],
)
def test_openai_validation_errors(compat: httpx.Client, body: dict, message: str) -> None:
    assert_openai_error(
        compat.post(CHAT, json=body), 400, "invalid_parameter_error", "invalid_request_error", message
    )


def test_openai_unknown_model_is_404(compat: httpx.Client) -> None:
    assert_openai_error(
        compat.post(CHAT, json=chat_body(model="gpt-4o")),
        404,
        "model_not_found",
        "invalid_request_error",
        "The model `gpt-4o` does not exist or you do not have access to it.",
    )


def marker_chat(marker: str) -> dict[str, Any]:
    return chat_body(messages=[{"role": "user", "content": f"x [sim:{marker}]"}])


@pytest.mark.parametrize(
    ("config", "headers", "body", "count", "status", "code", "kind", "message"),
    [
        pytest.param(
            SimulatorConfig(),
            {"Authorization": "Bearer sk-nope"},
            chat_body(),
            1,
            401,
            "invalid_api_key",
            "invalid_request_error",
            "Incorrect API key provided.",
            id="bad-key",
        ),
        pytest.param(
            SimulatorConfig(rpm=1),
            {},
            chat_body(),
            2,
            429,
            "limit_requests",
            "limit_requests",
            RATE,
            id="rpm-quota",
        ),
        pytest.param(
            SimulatorConfig(tpm=1),
            {},
            chat_body(),
            2,
            429,
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details. For "
            "details, see: https://help.aliyun.com/zh/model-studio/error-code#token-limit",
            id="tpm-quota",
        ),
        pytest.param(
            SimulatorConfig(fault_429=1.0),
            {},
            chat_body(),
            1,
            429,
            "limit_requests",
            "limit_requests",
            RATE,
            id="fault_429",
        ),
        pytest.param(
            SimulatorConfig(fault_500=1.0),
            {},
            chat_body(),
            1,
            500,
            "internal_error",
            "internal_error",
            "An internal error has occured, please try again later or contact service support.",
            id="fault_500",
        ),
        pytest.param(
            SimulatorConfig(fault_200_error=1.0),
            {},
            chat_body(),
            1,
            500,
            "internal_error",
            "internal_error",
            "An error occurred in model serving, error message is: [Internal server error!]",
            id="fault_200_error-is-a-500",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            marker_chat("DataInspectionFailed"),
            1,
            400,
            "data_inspection_failed",
            "data_inspection_failed",
            "Input data may contain inappropriate content.",
            id="inspection",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            marker_chat("Arrearage"),
            1,
            400,
            "Arrearage",
            "Arrearage",
            "Access denied, please make sure your account is in good standing.",
            id="arrearage",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            marker_chat("AccessDenied"),
            1,
            403,
            "access_denied",
            "access_denied",
            "Access denied.",
            id="access-denied",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            marker_chat("FreeTierOnly"),
            1,
            403,
            "AllocationQuota.FreeTierOnly",
            "AllocationQuota.FreeTierOnly",
            "The free tier of the model has been exhausted. If you wish to continue access the model"
            ' on a paid basis, please disable the "use free tier only" mode in the management'
            " console.",
            id="free-tier-only",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            marker_chat("FreeQuotaExceeded"),
            1,
            429,
            "insufficient_quota",
            "insufficient_quota",
            "Free allocated quota exceeded.",
            id="free-quota",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            marker_chat("TooLarge"),
            1,
            413,
            "BadRequest.TooLarge",
            "invalid_request_error",
            "Request body too large.",
            id="too-large",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            marker_chat("InternalError"),
            1,
            500,
            "internal_error",
            "internal_error",
            "An internal error has occured, please try again later or contact service support.",
            id="internal",
        ),
        pytest.param(
            SimulatorConfig(),
            {},
            marker_chat("OutputInspection"),
            1,
            400,
            "data_inspection_failed",
            "data_inspection_failed",
            "Output data may contain inappropriate content.",
            id="output",
        ),
    ],
)
def test_openai_errors(
    config: SimulatorConfig,
    headers: dict,
    body: dict,
    count: int,
    status: int,
    code: str,
    kind: str,
    message: str,
) -> None:
    for streamed in (False, True):  # a stream's errors are the same JSON, before any event
        request = {**body, "stream": True} if streamed else body
        if streamed and code == "data_inspection_failed" and "Output" in message:
            continue  # output moderation strikes mid-stream: see its own test
        response, stats = send_with(config, CHAT, request, headers=headers, count=count, compatible=True)
        assert_openai_error(response, status, code, kind, message)
        assert stats.streamed == (count - 1 if streamed else 0)  # the first of two got through


def test_openai_stream(sim: SimulatorThread, compat: httpx.Client) -> None:
    before = sim.stats.streamed
    response = compat.post(CHAT, json=chat_body(stream=True))

    chunks = openai_chunks(response)
    request_id = response.headers["x-request-id"]
    expected = simulated_reply("qwen-plus", HI)
    assert chunks[-1] == "[DONE]"
    choices = chunks[:-1]
    assert len(choices) >= 2
    for chunk in choices:
        created = chunk.pop("created")
        assert isinstance(created, int)
        assert chunk["id"] == f"chatcmpl-{request_id}"
        assert (chunk["object"], chunk["model"], chunk["usage"]) == (
            "chat.completion.chunk",
            "qwen-plus",
            None,
        )
        (choice,) = chunk["choices"]
        assert (choice["index"], choice["logprobs"], choice["delta"]["role"]) == (0, None, "assistant")
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in choices) == expected.content
    reasons = [chunk["choices"][0]["finish_reason"] for chunk in choices]
    assert reasons == [None] * (len(choices) - 1) + ["stop"]
    assert sim.stats.served[request_id] == expected.content
    assert sim.stats.streamed == before + 1


def test_openai_stream_with_thinking_and_usage(compat: httpx.Client) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, enable_thinking=True, max_tokens=9)
    chunks = openai_chunks(compat.post(CHAT, json=body))

    expected = simulated_reply("qwen-plus", HI, enable_thinking=True, max_tokens=9)
    assert chunks[-1] == "[DONE]"
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": expected.input_tokens,
        "completion_tokens": expected.output_tokens,
        "total_tokens": expected.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": expected.reasoning_tokens},
    }
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks[:-2]]
    split = next(i for i, delta in enumerate(deltas) if delta["content"] is not None)
    assert split >= 2
    assert all(d["content"] is None and d["reasoning_content"] for d in deltas[:split])
    assert all(d["content"] and d["reasoning_content"] is None for d in deltas[split:])
    assert "".join(d["reasoning_content"] for d in deltas[:split]) == expected.reasoning
    assert "".join(d["content"] for d in deltas[split:]) == expected.content
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"


def test_openai_stream_only_models_answer_streamed(compat: httpx.Client) -> None:
    for model in ("qwq-plus", "qwen3-8b", "qwen-omni-turbo"):
        chunks = openai_chunks(compat.post(CHAT, json=chat_body(model=model, stream=True)))
        assert chunks[-1] == "[DONE]"


def test_openai_truncate_fault_cuts_the_stream() -> None:
    with (
        SimulatorThread(SimulatorConfig(fault_truncate=1.0)) as simulator,
        httpx.Client(base_url=simulator.compatible_base_url, headers=AUTH, timeout=10) as http,
    ):
        text = received_until_cut(http, CHAT, chat_body(stream=True), {})

    chunks = parse_openai_chunks(text)
    assert chunks and "[DONE]" not in chunks
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)
    assert simulator.stats.outcomes == {"fault_truncate": 1}
    assert simulator.stats.served == {}


def test_openai_output_inspection_strikes_mid_stream(sim: SimulatorThread, compat: httpx.Client) -> None:
    response = compat.post(CHAT, json=chat_body(messages=INSPECTED, stream=True))

    chunks = openai_chunks(response)
    assert "[DONE]" not in chunks
    assert len(chunks) == 3
    assert all(chunk["choices"][0]["delta"]["content"] for chunk in chunks[:2])
    assert chunks[2] == {
        "error": {
            "message": OUTPUT_INSPECTION,
            "type": "data_inspection_failed",
            "param": None,
            "code": "data_inspection_failed",
        },
        "request_id": response.headers["x-request-id"],
    }
    assert response.headers["x-request-id"] not in sim.stats.served


def test_openai_json_schema_reply(compat: httpx.Client) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["title", "n"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}}
    body = compat.post(CHAT, json=chat_body(response_format=response_format)).json()

    content = body["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), schema)
    assert content == simulated_reply("qwen-plus", HI, response_format=response_format).content


# --- stats --------------------------------------------------------------------------------------


def test_stats_count_routes_and_streams() -> None:
    mm = {"model": "qwen3.5-plus", "input": {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}}
    with (
        SimulatorThread() as simulator,
        httpx.Client(base_url=simulator.base_url, headers=AUTH, timeout=10) as native,
        httpx.Client(base_url=simulator.compatible_base_url, headers=AUTH, timeout=10) as openai,
    ):
        native.post(TEXT, json=text_body())
        native.post(TEXT, json=text_body(), headers=SSE)
        native.post(TEXT, json=text_body(top_p=5), headers=SSE)  # an error event: streamed, not served
        native.post(MULTIMODAL, json=mm, headers=SSE)
        openai.post(CHAT, json=chat_body())
        openai.post(CHAT, json=chat_body(stream=True))
        openai.post(CHAT, json=chat_body(model="nope", stream=True))  # plain JSON 404
        native.post("/nowhere", json={})  # not a route

    stats = simulator.stats
    assert stats.routes == {"text": 3, "multimodal": 1, "openai": 3}
    assert stats.requests == 7
    assert stats.streamed == 4
    assert stats.outcomes == {"ok": 5, "bad_request_400": 2}
    assert len(stats.served) == len(stats.answered) == 5
    assert all(tokens > 0 for _, tokens in stats.answered)
