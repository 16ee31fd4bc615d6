"""The simulator's replies: a pure function of the request, cut, thinking, and in JSON when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from simulator_support import (
    CAT_URL,
    HI,
    MULTIMODAL,
    SSE,
    TEXT,
    assert_error,
    joined,
    native_events,
    reply_of,
    text_body,
)

from batchgen.simulator import (
    count_tokens,
    image_id,
    simulated_reply,
)

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
