"""The simulator's OpenAI-compatible route: shapes, errors and streams in OpenAI's words."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from simulator_support import (
    AUTH,
    CAT_URL,
    CHAT,
    EMPTY_INPUT,
    EMPTY_MODEL,
    HI,
    INSPECTED,
    MULTIMODAL,
    OUTPUT_INSPECTION,
    PNG_URI,
    RATE,
    STREAM_ONLY,
    THINKING_STREAM_ONLY,
    assert_openai_error,
    chat_body,
    openai_chunks,
    parse_openai_chunks,
    received_until_cut,
    send_with,
)

from batchgen.simulator import (
    IMAGE_TOKENS,
    SimulatorConfig,
    SimulatorThread,
    image_id,
    simulated_reply,
)

# --- the OpenAI-compatible route ------------------------------------------------------------


@pytest.fixture()
def compat(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.compatible_base_url, headers=AUTH, timeout=10) as http:
        yield http


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
