"""Streams, the OpenAI-compatible API, images and JSON mode as pure functions (no network).

The SSE frames are DashScope's, as recorded in ``shared/dashscope-protocol.md`` (Streaming):
``id:``/``event:``/``:HTTP_STATUS/``/``data:`` lines, the string "null" finish reason on
every chunk but the last, cumulative usage, errors under HTTP 200.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from batchgen import compat
from batchgen.client import _too_large
from batchgen.config import RunConfig, compatible_url, resolve_base_url
from batchgen.images import attach, cell_refs, has_local, materialize, resolve, row_images
from batchgen.jsonmode import mentions_json, reply_checker, response_format
from batchgen.prompts import RowProblem
from batchgen.protocol import (
    APIError,
    Disposition,
    NativeStream,
    Reply,
    build_body,
    classify,
    needs_stream,
)
from batchgen.ratelimit import REQUESTS, TOKENS, throttle_kind
from batchgen.runner import request_body
from batchgen.sse import SSEDecoder

# The frame quoted in the protocol notes, byte for byte (its request_id shortened there too).
RECORDED = (b'id:1\nevent:result\n:HTTP_STATUS/200\n'
            b'data:{"output":{"choices":[{"message":{"content":"1","role":"assistant"},'
            b'"finish_reason":"null"}]},"usage":{"total_tokens":9,"input_tokens":8,'
            b'"output_tokens":1},"request_id":"d272\xe2\x80\xa6"}\n\n')


def chunk(n: int, content: str, finish: str, output_tokens: int, reasoning: str = "",
          reasoning_tokens: int | None = None) -> bytes:
    message = {"content": content, "role": "assistant"}
    if reasoning:
        message["reasoning_content"] = reasoning
    usage = {"total_tokens": 8 + output_tokens, "input_tokens": 8, "output_tokens": output_tokens}
    if reasoning_tokens is not None:
        usage["output_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    data = {"output": {"choices": [{"message": message, "finish_reason": finish}]},
            "usage": usage, "request_id": "d272"}
    return (f"id:{n}\nevent:result\n:HTTP_STATUS/200\ndata:"
            f"{json.dumps(data, separators=(',', ':'))}\n\n").encode()


def assemble(raw: bytes, pieces: int = 1) -> Reply | APIError:
    """Decode ``raw`` fed in ``pieces`` slices (1 byte each with pieces=len(raw))."""
    decoder, stream = SSEDecoder(), NativeStream("header-id")
    size = max(1, -(-len(raw) // pieces))
    for i in range(0, len(raw), size):
        for event in decoder.feed(raw[i:i + size]):
            error = stream.add(event)
            if error is not None:
                return error
    for event in decoder.close():
        error = stream.add(event)
        if error is not None:
            return error
    return stream.result()


def test_recorded_frame_decodes_with_its_status_comment():
    events = SSEDecoder().feed(RECORDED)
    assert len(events) == 1
    event = events[0]
    assert (event.id, event.event, event.status) == ("1", "result", 200)
    body = json.loads(event.data)
    assert body["output"]["choices"][0]["finish_reason"] == "null"  # the string, not null
    assert body["usage"] == {"total_tokens": 9, "input_tokens": 8, "output_tokens": 1}


def test_recorded_frame_alone_is_a_cut_stream_not_a_reply():
    result = assemble(RECORDED)
    assert isinstance(result, APIError)
    assert result.code == "batchgen.StreamCut"
    assert result.disposition is Disposition.RETRY
    assert "after 1 chunk" in result.message


@pytest.mark.parametrize("pieces", [1, 7, 10_000])  # whole, in slices, byte by byte
def test_deltas_join_and_the_last_usage_wins(pieces):
    raw = (RECORDED + chunk(2, ", 2", "null", 3) + chunk(3, ", 3", "null", 5)
           + chunk(4, "", "stop", 5))
    result = assemble(raw, pieces)
    assert isinstance(result, Reply)
    assert result.content == "1, 2, 3"
    assert result.finish_reason == "stop"
    assert (result.input_tokens, result.output_tokens, result.total_tokens) == (8, 5, 13)
    assert result.request_id == "header-id"


def test_reasoning_deltas_come_first_and_fill_reasoning():
    raw = (chunk(1, "", "null", 1, reasoning="Let me", reasoning_tokens=1)
           + chunk(2, "", "null", 2, reasoning=" think.", reasoning_tokens=2)
           + chunk(3, "Four.", "null", 3, reasoning_tokens=2)
           + chunk(4, "", "stop", 3, reasoning_tokens=2))
    result = assemble(raw)
    assert isinstance(result, Reply)
    assert (result.reasoning, result.content, result.reasoning_tokens) == ("Let me think.",
                                                                           "Four.", 2)


def test_crlf_line_endings_and_unknown_comments():
    raw = RECORDED.replace(b"\n", b"\r\n") + b":keepalive\r\n" + chunk(2, "", "length", 1)
    result = assemble(raw, pieces=len(raw))  # a CR and its LF can arrive apart
    assert isinstance(result, Reply)
    assert (result.content, result.finish_reason) == ("1", "length")


def test_multimodal_stream_content_is_a_parts_list():
    data = {"output": {"choices": [{"message": {"content": [{"text": "a cat"}],
                                                "role": "assistant"}, "finish_reason": "stop"}]},
            "usage": {"input_tokens": 300, "output_tokens": 2}, "request_id": "r"}
    result = assemble(b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:" + json.dumps(data).encode()
                      + b"\n\n")
    assert isinstance(result, Reply)
    assert (result.content, result.total_tokens) == ("a cat", 302)


@pytest.mark.parametrize(("status", "code", "message", "disposition"), [
    (429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later.",
     Disposition.RETRY),
    (500, "InternalError", "An internal error has occured", Disposition.RETRY),
    (400, "DataInspectionFailed", "Output data may contain inappropriate content.",
     Disposition.ROW_ERROR),
    (401, "InvalidApiKey", "Invalid API-key provided.", Disposition.FATAL),
])
def test_error_event_under_http_200_carries_the_real_status(status, code, message, disposition):
    raw = (RECORDED + f"id:2\nevent:error\n:HTTP_STATUS/{status}\ndata:"
           f'{{"code":"{code}","message":"{message}","request_id":"e1"}}\n\n'.encode())
    result = assemble(raw)
    assert isinstance(result, APIError)
    assert (result.http_status, result.code, result.request_id) == (status, code, "e1")
    assert result.disposition is disposition


def test_a_streamed_429_slows_the_rate_like_any_429():
    raw = (b'id:1\nevent:error\n:HTTP_STATUS/429\ndata:{"code":"Throttling.AllocationQuota",'
           b'"message":"Allocated quota exceeded, please increase your quota limit.",'
           b'"request_id":"x"}\n\n')
    error = assemble(raw)
    assert isinstance(error, APIError) and error.http_status == 429
    assert throttle_kind(error.code, error.message) == TOKENS


def test_a_stream_event_that_is_not_json_is_retried():
    result = assemble(b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\n\n")
    assert isinstance(result, APIError)
    assert (result.code, result.disposition) == ("batchgen.BadResponse", Disposition.RETRY)


@pytest.mark.parametrize(("model", "parameters", "streamed"), [
    ("qwen-plus", {}, False),
    ("qwen-plus", {"enable_thinking": True}, False),
    ("qwq-plus", {}, True),
    ("qvq-max", {}, True),
    ("qwen3-omni-flash", {}, True),
    ("qwen-omni-turbo", {}, True),
    ("qwen3-8b", {}, True),
    ("qwen3-235b-a22b", {}, True),
    ("qwen3-30b-a3b", {"enable_thinking": False}, False),
    ("qwen3-max", {}, False),
    ("qwen3.5-plus", {"enable_thinking": True}, False),
])
def test_which_requests_must_be_streamed(model, parameters, streamed):
    assert needs_stream(model, parameters) is streamed


def test_needs_stream_agrees_with_the_simulator():
    from batchgen.simulator import only_streamed

    for model in ("qwen-plus", "qwq-plus", "qvq-max", "qwen3-omni-flash", "qwen3-8b",
                  "qwen3-235b-a22b", "qwen3-max", "qwen3.5-plus", "qwen-vl-max"):
        for parameters in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            assert needs_stream(model, parameters) is only_streamed(model, parameters), \
                (model, parameters)


def test_streaming_flags_stay_out_of_the_request_that_is_hashed():
    config = RunConfig(api_key="k", model="qwq-plus")
    body = request_body(config, [{"role": "user", "content": "hi"}])
    assert config.effective_stream
    assert "incremental_output" not in body["parameters"]
    assert RunConfig(api_key="k", model="qwq-plus", stream=False).effective_stream is False


# --- the OpenAI-compatible API -----------------------------------------------------------

def test_openai_body_has_parameters_at_the_top_and_typed_parts():
    config = RunConfig(api_key="k", api="openai", model="qwen-vl-max",
                       parameters={"max_tokens": 5, "enable_thinking": False})
    body = request_body(config, [{"role": "user", "content": [{"image": "https://x/a.png"},
                                                              {"text": "what is it?"}]}])
    assert body == {"model": "qwen-vl-max", "max_tokens": 5, "enable_thinking": False,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                        {"type": "text", "text": "what is it?"}]}]}
    assert config.url == "https://dashscope-intl.aliyuncs.com/api/v1/chat/completions"
    assert compat.streamed_body(body)["stream_options"] == {"include_usage": True}


def test_native_body_converts_openai_parts_from_a_messages_column():
    body = build_body("qwen-vl-max", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
        {"type": "text", "text": "what?"}]}], {}, "multimodal")
    assert body["input"]["messages"][0]["content"] == [{"image": "https://x/a.png"},
                                                       {"text": "what?"}]


def test_openai_reply_usage_and_request_id():
    raw = json.dumps({
        "choices": [{"message": {"role": "assistant", "content": "Hi!",
                                 "reasoning_content": "short"}, "finish_reason": "stop",
                     "index": 0, "logprobs": None}],
        "object": "chat.completion",
        "usage": {"prompt_tokens": 12, "completion_tokens": 21, "total_tokens": 33,
                  "prompt_tokens_details": {"cached_tokens": 4},
                  "completion_tokens_details": {"reasoning_tokens": 20}},
        "created": 1735120033, "model": "qwen-plus", "id": "chatcmpl-abc"}).encode()
    reply = compat.interpret(200, {"x-request-id": "abc"}, raw)
    assert reply == Reply("Hi!", "short", "stop", "abc", 12, 21, 33, 4, 20)
    assert compat.interpret(200, {}, raw).request_id == "chatcmpl-abc"  # no header: the body's id


def test_openai_reply_from_a_server_that_says_reasoning():
    raw = b'{"choices":[{"message":{"content":"x","reasoning":"hm"},"finish_reason":"stop"}]}'
    reply = compat.interpret(200, {}, raw)
    assert isinstance(reply, Reply) and reply.reasoning == "hm" and reply.input_tokens is None


@pytest.mark.parametrize(("status", "body", "code", "disposition"), [
    (401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                     "param": None, "code": "invalid_api_key"}}, "invalid_api_key",
     Disposition.FATAL),
    (429, {"error": {"message": "Requests rate limit exceeded, please try again later.",
                     "type": "limit_requests", "code": "limit_requests"}}, "limit_requests",
     Disposition.RETRY),
    (429, {"error": {"message": "Free allocated quota exceeded.", "type": "insufficient_quota",
                     "code": "insufficient_quota"}}, "insufficient_quota", Disposition.FATAL),
    (400, {"error": {"message": "Input data may contain inappropriate content.",
                     "type": "data_inspection_failed", "code": "data_inspection_failed"}},
     "data_inspection_failed", Disposition.ROW_ERROR),
    (404, {"error": "model 'llama9' not found"}, "HTTP404", Disposition.FATAL),  # Ollama
    (500, {"error": {"message": "boom", "type": "internal_error", "code": None}},
     "internal_error", Disposition.RETRY),
])
def test_openai_error_envelope(status, body, code, disposition):
    error = compat.interpret(status, {}, json.dumps({**body, "request_id": "r1"}).encode())
    assert isinstance(error, APIError)
    assert (error.code, error.disposition, error.request_id) == (code, disposition, "r1")


def test_openai_rate_429_slows_the_request_rate():
    assert throttle_kind("limit_requests", "Requests rate limit exceeded") == REQUESTS
    assert classify(429, "limit_requests", "x") is Disposition.RETRY


def openai_stream(*chunks: dict, done: bool = True) -> bytes:
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return raw + (b"data: [DONE]\n\n" if done else b"")


def delta(content: str = "", finish: str | None = None, **extra: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": content, **extra}, "finish_reason": finish}],
        "usage": None}


USAGE = {"id": "chatcmpl-1", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def read_openai(raw: bytes) -> Reply | APIError:
    decoder, stream = SSEDecoder(), compat.OpenAIStream("hdr")
    for event in [*decoder.feed(raw), *decoder.close()]:
        error = stream.add(event)
        if error is not None:
            return error
    return stream.result()


def test_openai_stream_joins_deltas_and_keeps_the_usage_chunk():
    raw = openai_stream(delta("", reasoning_content="hmm"), delta("Hel"), delta("lo"),
                        delta("", "stop"), USAGE)
    reply = read_openai(raw)
    assert reply == Reply("Hello", "hmm", "stop", "hdr", 5, 3, 8, None, None)


def test_openai_stream_without_done_is_complete_once_finish_and_usage_came():
    assert isinstance(read_openai(openai_stream(delta("a", "stop"), USAGE, done=False)), Reply)
    cut = read_openai(openai_stream(delta("a"), delta("b"), done=False))
    assert isinstance(cut, APIError) and cut.code == "batchgen.StreamCut"


def test_openai_stream_error_event():
    raw = openai_stream(delta("a"), {"error": {"message": "Output data may contain "
                                               "inappropriate content.",
                                               "code": "data_inspection_failed"}}, done=False)
    error = read_openai(raw)
    assert isinstance(error, APIError) and error.disposition is Disposition.ROW_ERROR


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"),
    ({"DASHSCOPE_API_REGION": "cn"}, "https://dashscope.aliyuncs.com/compatible-mode/v1"),
    ({"DASHSCOPE_HTTP_BASE_URL": "http://127.0.0.1:9/api/v1"},
     "http://127.0.0.1:9/compatible-mode/v1"),
    ({"OPENAI_BASE_URL": "http://localhost:8000/v1",
      "DASHSCOPE_HTTP_BASE_URL": "http://127.0.0.1:9/api/v1"}, "http://localhost:8000/v1"),
])
def test_openai_base_url(environ, expected):
    assert resolve_base_url(None, None, environ, api="openai") == expected
    assert compatible_url("http://h/api/v1/") == "http://h/compatible-mode/v1"


def test_openai_base_url_is_ignored_by_the_native_api():
    assert resolve_base_url(None, None, {"OPENAI_BASE_URL": "http://x/v1"}) \
        == "https://dashscope-intl.aliyuncs.com/api/v1"


# --- images ------------------------------------------------------------------------------

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwAD"
                       "hgGAWjR9awAAAABJRU5ErkJggg==")


@pytest.mark.parametrize(("cell", "refs"), [
    (None, []), ("", []), ("  ", []), ("https://x/a.png", ["https://x/a.png"]),
    ('["a.png", "b.jpg"]', ["a.png", "b.jpg"]), (["a.png", None, " "], ["a.png"]),
])
def test_image_cells(cell, refs):
    assert cell_refs(cell) == refs


def test_a_bad_image_cell_is_a_row_problem():
    assert isinstance(cell_refs("[not json"), RowProblem)
    assert isinstance(cell_refs([1, 2]), RowProblem)


def test_local_images_resolve_relative_to_the_table_and_carry_a_fingerprint(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(PNG)
    ref = resolve("img/a.png", tmp_path)
    assert isinstance(ref, str) and ref.startswith("file:///") and ref.endswith(f"#{len(PNG)}-"
                                                                                + ref.split("-")[-1])
    assert resolve("https://x/a.png", tmp_path) == "https://x/a.png"
    missing = resolve("img/nope.png", tmp_path)
    assert isinstance(missing, RowProblem) and missing.code == "batchgen.ImageNotFound"
    (tmp_path / "notes.txt").write_text("x")
    wrong = resolve("notes.txt", tmp_path)
    assert isinstance(wrong, RowProblem) and wrong.code == "batchgen.InvalidImage"


def test_images_go_before_the_text_of_the_last_user_message_and_are_read_at_send(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    images = row_images(["a.png", "https://x/b.jpg"], tmp_path)
    messages = attach([{"role": "system", "content": "sys"},
                       {"role": "user", "content": "what?"}], images)
    assert messages[0] == {"role": "system", "content": "sys"}
    body = build_body("qwen-vl-max", messages, {}, "multimodal")
    assert has_local(body)
    sent = materialize(body)
    parts = sent["input"]["messages"][1]["content"]
    assert parts[0] == {"image": "data:image/png;base64," + base64.b64encode(PNG).decode()}
    assert parts[1:] == [{"image": "https://x/b.jpg"}, {"text": "what?"}]
    assert not has_local(sent)
    openai = materialize(compat.build_body("qwen-vl-max", messages, {}))
    assert openai["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png")


def test_bodies_over_the_gateway_limit_are_refused_before_sending():
    assert _too_large(b"x" * (16 * 2**20)) is None
    refused = _too_large(b"x" * (16 * 2**20 + 1))
    assert refused is not None and refused.disposition is Disposition.ROW_ERROR
    assert refused.code == "batchgen.TooLarge"
    assert _too_large(b";base64," + b"x" * (40 * 2**20)) is None
    assert _too_large(b";base64," + b"x" * (64 * 2**20)) is not None


# --- JSON mode ---------------------------------------------------------------------------

def test_json_mode_needs_the_word_json():
    assert mentions_json([{"role": "system", "content": "Answer in JSON."}])
    assert mentions_json([{"role": "user", "content": [{"image": "u"}, {"text": "give json"}]}])
    assert not mentions_json([{"role": "user", "content": "hello"}])
    config = RunConfig(api_key="k", parameters={"response_format": {"type": "json_object"}})
    problem = request_body(config, [{"role": "user", "content": "hello"}])
    assert isinstance(problem, RowProblem) and problem.code == "batchgen.NoJsonWord"


SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
          "required": ["label"]}


def test_schema_is_sent_where_supported_else_json_mode():
    sent = response_format("qwen-plus", {}, json_mode=False, schema=SCHEMA, name="my schema!")
    assert sent == {"type": "json_schema", "json_schema": {"name": "my_schema_", "schema": SCHEMA,
                                                           "strict": True}}
    assert response_format("qwq-plus", {}, json_mode=False, schema=SCHEMA) == {"type": "json_object"}
    assert response_format("qwen-plus", {"enable_thinking": True}, json_mode=True,
                           schema=None) == {"type": "json_object"}
    assert response_format("qwen-plus", {}, json_mode=False, schema=None) is None


def test_reply_checker():
    assert reply_checker({}, None) is None
    plain = reply_checker({"response_format": {"type": "json_object"}}, None)
    assert plain('{"a": 1}') and not plain('{"a": 1') and not plain("[1]") and not plain(None)
    shaped = reply_checker({"response_format": {"type": "json_object"}}, SCHEMA)
    assert shaped('{"label": "pos"}') and not shaped('{"label": "meh"}')
    sent = reply_checker({"response_format": response_format("qwen-plus", {}, json_mode=False,
                                                              schema=SCHEMA)}, None)
    assert sent('{"label": "neg"}') and not sent("{}")


def test_an_unreadable_schema_is_a_usage_error(tmp_path):
    from batchgen.errors import UsageError
    from batchgen.jsonmode import load_schema

    (tmp_path / "bad.json").write_text('{"type": "object", "properties": 3}')
    with pytest.raises(UsageError, match="not a valid JSON Schema"):
        load_schema(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="cannot read"):
        load_schema(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_schema(Path(tmp_path / "x.json"))


def test_images_count_in_token_estimates():
    from batchgen.budget import IMAGE_TOKENS_MAX, count_images, count_input_tokens

    text = [{"role": "user", "content": [{"text": "what is it?"}]}]
    native = [{"role": "user", "content": [{"image": "u"}, {"image": "v"}, {"text": "what is it?"}]}]
    openai = compat.build_body("m", native, {})["messages"]
    assert count_images(native) == count_images(openai) == 2 and count_images(text) == 0
    base = count_input_tokens("qwen-vl-max", text)
    assert count_input_tokens("qwen-vl-max", native) == base
    assert count_input_tokens("qwen-vl-max", openai, IMAGE_TOKENS_MAX) == base + 2 * IMAGE_TOKENS_MAX
