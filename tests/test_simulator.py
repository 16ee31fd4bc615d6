"""The DashScope simulator, exercised over real loopback HTTP as batchgen's client will use it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchgen.simulator import (
    DEMO_KEY,
    Simulator,
    SimulatorConfig,
    SimulatorThread,
    TokenBucket,
    count_tokens,
    simulated_reply,
)

TEXT = "/services/aigc/text-generation/generation"
MULTIMODAL = "/services/aigc/multimodal-generation/generation"
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
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
    assert data["usage"]["input_tokens_details"] == {"text_tokens": expected.input_tokens}
    assert data["usage"]["total_tokens"] == expected.total_tokens
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
        pytest.param("POST", "/compatible-mode/v1/chat/completions", id="compatible-mode"),
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
     "qwen3-coder-plus", "qwq-plus", "qwen2.5-72b-instruct", "qwen3-8b", "qwen3-235b-a22b",
     "batch-test-model"],
)  # fmt: skip
def test_known_text_models_answer(client: httpx.Client, model: str) -> None:
    assert client.post(TEXT, json=text_body(model=model)).status_code == 200


@pytest.mark.parametrize(
    "model",
    ["qwen3.5-plus", "qwen3.6-plus", "qwen3.7-flash", "qwen-vl-max", "qwen3-vl-plus",
     "qwen-omni-turbo", "qwen3-omni-flash"],
)  # fmt: skip
def test_multimodal_models_answer_on_their_route_only(client: httpx.Client, model: str) -> None:
    parts = [{"role": "user", "content": [{"text": "Hi"}]}]
    multimodal = client.post(MULTIMODAL, json={"model": model, "input": {"messages": parts}})
    text = client.post(TEXT, json=text_body(model=model))

    assert multimodal.status_code == 200
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
