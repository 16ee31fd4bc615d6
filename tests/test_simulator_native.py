"""The simulator's native routes: the shape of their answers, the gateway's checks before the model."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from simulator_support import (
    EMPTY_INPUT,
    EMPTY_MODEL,
    HI,
    MULTIMODAL,
    SSE,
    TEXT,
    assert_error,
    text_body,
)

from batchgen.simulator import (
    DEMO_KEY,
    IMAGE_TOKENS,
    SimulatorThread,
    image_id,
    simulated_reply,
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
