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

from batchgen.api import openai as compat
from batchgen.api.faults import classify
from batchgen.api.models import needs_stream
from batchgen.api.native import NativeStream, build_body, too_large
from batchgen.api.types import APIError, Disposition, Reply
from batchgen.config import RunConfig, compatible_url, resolve_base_url
from batchgen.errors import RowProblem
from batchgen.images import attach, cell_refs, has_local, materialize, resolve, row_images
from batchgen.jsonmode import mentions_json, reply_checker, response_format
from batchgen.planning import request_body
from batchgen.ratelimit import REQUESTS, TOKENS, throttle_kind
from batchgen.sse import SSEDecoder

# The frame quoted in the protocol notes, byte for byte (its request_id shortened there too).
RECORDED = (
    b"id:1\nevent:result\n:HTTP_STATUS/200\n"
    b'data:{"output":{"choices":[{"message":{"content":"1","role":"assistant"},'
    b'"finish_reason":"null"}]},"usage":{"total_tokens":9,"input_tokens":8,'
    b'"output_tokens":1},"request_id":"d272\xe2\x80\xa6"}\n\n'
)


def chunk(
    n: int,
    content: str,
    finish: str,
    output_tokens: int,
    reasoning: str = "",
    reasoning_tokens: int | None = None,
) -> bytes:
    message = {"content": content, "role": "assistant"}
    if reasoning:
        message["reasoning_content"] = reasoning
    usage = {"total_tokens": 8 + output_tokens, "input_tokens": 8, "output_tokens": output_tokens}
    if reasoning_tokens is not None:
        usage["output_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    data = {
        "output": {"choices": [{"message": message, "finish_reason": finish}]},
        "usage": usage,
        "request_id": "d272",
    }
    return (
        f"id:{n}\nevent:result\n:HTTP_STATUS/200\ndata:{json.dumps(data, separators=(',', ':'))}\n\n"
    ).encode()


def assemble(raw: bytes, pieces: int = 1) -> Reply | APIError:
    """Decode ``raw`` fed in ``pieces`` slices (1 byte each with pieces=len(raw))."""
    decoder, stream = SSEDecoder(), NativeStream("header-id")
    size = max(1, -(-len(raw) // pieces))
    for i in range(0, len(raw), size):
        for event in decoder.feed(raw[i : i + size]):
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
    raw = RECORDED + chunk(2, ", 2", "null", 3) + chunk(3, ", 3", "null", 5) + chunk(4, "", "stop", 5)
    result = assemble(raw, pieces)
    assert isinstance(result, Reply)
    assert result.content == "1, 2, 3"
    assert result.finish_reason == "stop"
    assert (result.input_tokens, result.output_tokens, result.total_tokens) == (8, 5, 13)
    assert result.request_id == "header-id"


def test_reasoning_deltas_come_first_and_fill_reasoning():
    raw = (
        chunk(1, "", "null", 1, reasoning="Let me", reasoning_tokens=1)
        + chunk(2, "", "null", 2, reasoning=" think.", reasoning_tokens=2)
        + chunk(3, "Four.", "null", 3, reasoning_tokens=2)
        + chunk(4, "", "stop", 3, reasoning_tokens=2)
    )
    result = assemble(raw)
    assert isinstance(result, Reply)
    assert (result.reasoning, result.content, result.reasoning_tokens) == ("Let me think.", "Four.", 2)


def test_crlf_line_endings_and_unknown_comments():
    raw = RECORDED.replace(b"\n", b"\r\n") + b":keepalive\r\n" + chunk(2, "", "length", 1)
    result = assemble(raw, pieces=len(raw))  # a CR and its LF can arrive apart
    assert isinstance(result, Reply)
    assert (result.content, result.finish_reason) == ("1", "length")


def test_multimodal_stream_content_is_a_parts_list():
    data = {
        "output": {
            "choices": [
                {"message": {"content": [{"text": "a cat"}], "role": "assistant"}, "finish_reason": "stop"}
            ]
        },
        "usage": {"input_tokens": 300, "output_tokens": 2},
        "request_id": "r",
    }
    result = assemble(b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:" + json.dumps(data).encode() + b"\n\n")
    assert isinstance(result, Reply)
    assert (result.content, result.total_tokens) == ("a cat", 302)


@pytest.mark.parametrize(
    ("status", "code", "message", "disposition"),
    [
        (
            429,
            "Throttling.RateQuota",
            "Requests rate limit exceeded, please try again later.",
            Disposition.RETRY,
        ),
        (500, "InternalError", "An internal error has occured", Disposition.RETRY),
        (
            400,
            "DataInspectionFailed",
            "Output data may contain inappropriate content.",
            Disposition.ROW_ERROR,
        ),
        (401, "InvalidApiKey", "Invalid API-key provided.", Disposition.FATAL),
    ],
)
def test_error_event_under_http_200_carries_the_real_status(status, code, message, disposition):
    raw = (
        RECORDED
        + f"id:2\nevent:error\n:HTTP_STATUS/{status}\ndata:"
        f'{{"code":"{code}","message":"{message}","request_id":"e1"}}\n\n'.encode()
    )
    result = assemble(raw)
    assert isinstance(result, APIError)
    assert (result.http_status, result.code, result.request_id) == (status, code, "e1")
    assert result.disposition is disposition


def test_a_streamed_429_slows_the_rate_like_any_429():
    raw = (
        b'id:1\nevent:error\n:HTTP_STATUS/429\ndata:{"code":"Throttling.AllocationQuota",'
        b'"message":"Allocated quota exceeded, please increase your quota limit.",'
        b'"request_id":"x"}\n\n'
    )
    error = assemble(raw)
    assert isinstance(error, APIError) and error.http_status == 429
    assert throttle_kind(error.code, error.message) == TOKENS


def test_a_stream_event_that_is_not_json_is_retried():
    result = assemble(b'id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"output\n\n')
    assert isinstance(result, APIError)
    assert (result.code, result.disposition) == ("batchgen.BadResponse", Disposition.RETRY)


@pytest.mark.parametrize(
    "message",
    [
        "parameter.enable_thinking must be set to false for non-streaming calls",
        "This model only support stream mode, please enable the stream parameter to access the model.",
    ],
)
def test_refusals_of_unstreamed_calls_stop_the_run_with_the_fix(message):
    from batchgen.api.faults import fatal_hint
    from batchgen.api.native import interpret

    native = interpret(400, {}, json.dumps({"code": "InvalidParameter", "message": message}).encode())
    openai = compat.interpret(
        400,
        {},
        json.dumps(
            {
                "error": {
                    "code": "invalid_parameter_error",
                    "message": message,
                    "type": "invalid_request_error",
                }
            }
        ).encode(),
    )
    for error in (native, openai):
        assert isinstance(error, APIError) and error.disposition is Disposition.FATAL
        assert "--no-stream" in fatal_hint(error)


@pytest.mark.parametrize(
    ("model", "parameters", "streamed"),
    [
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
        ("qwen3-next-80b-a3b-thinking", {}, True),
    ],
)
def test_which_requests_must_be_streamed(model, parameters, streamed):
    assert needs_stream(model, parameters) is streamed


def test_thinking_is_streamed_unless_told_otherwise():
    assert RunConfig(api_key="k", parameters={"enable_thinking": True}).effective_stream
    assert not RunConfig(api_key="k").effective_stream
    assert not RunConfig(api_key="k", parameters={"enable_thinking": True}, stream=False).effective_stream


def test_needs_stream_agrees_with_the_simulator():
    from batchgen.simulator import only_streamed

    for model in (
        "qwen-plus",
        "qwq-plus",
        "qvq-max",
        "qwen3-omni-flash",
        "qwen3-8b",
        "qwen3-235b-a22b",
        "qwen3-max",
        "qwen3.5-plus",
        "qwen-vl-max",
        "qwen3-next-80b-a3b-thinking",
        "qwen3-vl-235b-a22b-thinking",
    ):
        for parameters in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            assert needs_stream(model, parameters) is only_streamed(model, parameters), (model, parameters)


def test_streaming_flags_stay_out_of_the_request_that_is_hashed():
    config = RunConfig(api_key="k", model="qwq-plus")
    body = request_body(config, [{"role": "user", "content": "hi"}])
    assert config.effective_stream
    assert "incremental_output" not in body["parameters"]
    assert RunConfig(api_key="k", model="qwq-plus", stream=False).effective_stream is False


# --- the OpenAI-compatible API -----------------------------------------------------------


def test_openai_body_has_parameters_at_the_top_and_typed_parts():
    config = RunConfig(
        api_key="k", api="openai", model="qwen-vl-max", parameters={"max_tokens": 5, "enable_thinking": False}
    )
    body = request_body(
        config, [{"role": "user", "content": [{"image": "https://x/a.png"}, {"text": "what is it?"}]}]
    )
    assert body == {
        "model": "qwen-vl-max",
        "max_tokens": 5,
        "enable_thinking": False,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                    {"type": "text", "text": "what is it?"},
                ],
            }
        ],
    }
    assert config.url == "https://dashscope-intl.aliyuncs.com/api/v1/chat/completions"
    assert compat.streamed_body(body)["stream_options"] == {"include_usage": True}


def test_native_body_converts_openai_parts_from_a_messages_column():
    body = build_body(
        "qwen-vl-max",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                    {"type": "text", "text": "what?"},
                ],
            }
        ],
        {},
        "multimodal",
    )
    assert body["input"]["messages"][0]["content"] == [{"image": "https://x/a.png"}, {"text": "what?"}]


def test_openai_reply_usage_and_request_id():
    raw = json.dumps(
        {
            "choices": [
                {
                    "message": {"role": "assistant", "content": "Hi!", "reasoning_content": "short"},
                    "finish_reason": "stop",
                    "index": 0,
                    "logprobs": None,
                }
            ],
            "object": "chat.completion",
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 21,
                "total_tokens": 33,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 20},
            },
            "created": 1735120033,
            "model": "qwen-plus",
            "id": "chatcmpl-abc",
        }
    ).encode()
    reply = compat.interpret(200, {"x-request-id": "abc"}, raw)
    assert reply == Reply("Hi!", "short", "stop", "abc", 12, 21, 33, 4, 20)
    assert compat.interpret(200, {}, raw).request_id == "chatcmpl-abc"  # no header: the body's id


def test_openai_reply_from_a_server_that_says_reasoning():
    raw = b'{"choices":[{"message":{"content":"x","reasoning":"hm"},"finish_reason":"stop"}]}'
    reply = compat.interpret(200, {}, raw)
    assert isinstance(reply, Reply) and reply.reasoning == "hm" and reply.input_tokens is None


@pytest.mark.parametrize(
    ("status", "body", "code", "disposition"),
    [
        (
            401,
            {
                "error": {
                    "message": "Incorrect API key provided.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
            "invalid_api_key",
            Disposition.FATAL,
        ),
        (
            429,
            {
                "error": {
                    "message": "Requests rate limit exceeded, please try again later.",
                    "type": "limit_requests",
                    "code": "limit_requests",
                }
            },
            "limit_requests",
            Disposition.RETRY,
        ),
        (
            429,
            {
                "error": {
                    "message": "Free allocated quota exceeded.",
                    "type": "insufficient_quota",
                    "code": "insufficient_quota",
                }
            },
            "insufficient_quota",
            Disposition.FATAL,
        ),
        (
            400,
            {
                "error": {
                    "message": "Input data may contain inappropriate content.",
                    "type": "data_inspection_failed",
                    "code": "data_inspection_failed",
                }
            },
            "data_inspection_failed",
            Disposition.ROW_ERROR,
        ),
        (404, {"error": "model 'llama9' not found"}, "HTTP404", Disposition.FATAL),  # Ollama
        (
            500,
            {"error": {"message": "boom", "type": "internal_error", "code": None}},
            "internal_error",
            Disposition.RETRY,
        ),
    ],
)
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
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content, **extra}, "finish_reason": finish}],
        "usage": None,
    }


USAGE = {
    "id": "chatcmpl-1",
    "choices": [],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
}


def read_openai(raw: bytes) -> Reply | APIError:
    decoder, stream = SSEDecoder(), compat.OpenAIStream("hdr")
    for event in [*decoder.feed(raw), *decoder.close()]:
        error = stream.add(event)
        if error is not None:
            return error
    return stream.result()


def test_openai_stream_joins_deltas_and_keeps_the_usage_chunk():
    raw = openai_stream(
        delta("", reasoning_content="hmm"), delta("Hel"), delta("lo"), delta("", "stop"), USAGE
    )
    reply = read_openai(raw)
    assert reply == Reply("Hello", "hmm", "stop", "hdr", 5, 3, 8, None, None)


def test_openai_stream_without_done_is_complete_once_the_finish_reason_came():
    assert isinstance(read_openai(openai_stream(delta("a", "stop"), USAGE, done=False)), Reply)
    whole = read_openai(openai_stream(delta("a", "stop"), done=False))  # no usage chunk at all
    assert isinstance(whole, Reply) and whole.content == "a" and whole.input_tokens is None
    cut = read_openai(openai_stream(delta("a"), delta("b"), done=False))
    assert isinstance(cut, APIError) and cut.code == "batchgen.StreamCut"


def test_a_vllm_error_inside_a_stream_with_a_numeric_code_is_retried():
    error = read_openai(
        openai_stream(
            delta("a"),
            {
                "error": {
                    "object": "error",
                    "message": "engine died",
                    "type": "InternalServerError",
                    "code": 500,
                }
            },
            done=False,
        )
    )
    assert isinstance(error, APIError)
    assert (error.http_status, error.code, error.disposition) == (
        500,
        "InternalServerError",
        Disposition.RETRY,
    )


def test_a_cut_stream_knows_what_it_was_billed():
    decoder, stream = SSEDecoder(), NativeStream(None)
    for event in decoder.feed(RECORDED + chunk(2, " more", "null", 7)):
        stream.add(event)
    assert stream.billed() == (8, 7)
    assert NativeStream(None).billed() is None


def test_openai_stream_error_event():
    raw = openai_stream(
        delta("a"),
        {
            "error": {
                "message": "Output data may contain inappropriate content.",
                "code": "data_inspection_failed",
            }
        },
        done=False,
    )
    error = read_openai(raw)
    assert isinstance(error, APIError) and error.disposition is Disposition.ROW_ERROR


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"),
        ({"DASHSCOPE_API_REGION": "cn"}, "https://dashscope.aliyuncs.com/compatible-mode/v1"),
        ({"DASHSCOPE_HTTP_BASE_URL": "http://127.0.0.1:9/api/v1"}, "http://127.0.0.1:9/compatible-mode/v1"),
        (
            {
                "OPENAI_BASE_URL": "http://localhost:8000/v1",
                "DASHSCOPE_HTTP_BASE_URL": "http://127.0.0.1:9/api/v1",
            },
            "http://localhost:8000/v1",
        ),
    ],
)
def test_openai_base_url(environ, expected):
    assert resolve_base_url(None, None, environ, api="openai") == expected
    assert compatible_url("http://h/api/v1/") == "http://h/compatible-mode/v1"


def test_openai_base_url_is_ignored_by_the_native_api():
    assert (
        resolve_base_url(None, None, {"OPENAI_BASE_URL": "http://x/v1"})
        == "https://dashscope-intl.aliyuncs.com/api/v1"
    )


# --- images ------------------------------------------------------------------------------

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize(
    ("cell", "refs"),
    [
        (None, []),
        ("", []),
        ("  ", []),
        ("https://x/a.png", ["https://x/a.png"]),
        ('["a.png", "b.jpg"]', ["a.png", "b.jpg"]),
        (["a.png", None, " "], ["a.png"]),
    ],
)
def test_image_cells(cell, refs):
    assert cell_refs(cell) == refs


def test_a_bad_image_cell_is_a_row_problem_and_a_bracketed_name_is_a_file():
    assert isinstance(cell_refs([1, 2]), RowProblem)
    assert isinstance(cell_refs('["a.png", 3]'), RowProblem)
    assert cell_refs("[1].png") == ["[1].png"]


def test_file_uris_relative_and_absolute(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a b#1.png").write_bytes(PNG)
    relative = resolve("file://dir/a%20b%231.png", tmp_path)
    absolute = resolve((tmp_path / "dir" / "a b#1.png").as_uri(), Path("/elsewhere"))
    assert isinstance(relative, str) and relative == absolute
    assert materialize({"messages": [{"role": "user", "content": [{"image": relative}]}]})["messages"][0][
        "content"
    ][0]["image"].startswith("data:image/png;base64,")


def test_a_row_whose_image_files_are_over_the_limit_is_refused_when_planned(tmp_path):
    with (tmp_path / "big.png").open("wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")  # a PNG's first bytes, then
        f.truncate(25 * 2**20)  # sparse: 25 MiB, 33 MiB as base64
    assert isinstance(row_images(["big.png"], tmp_path), list)
    refused = row_images([["big.png", "big.png"]], tmp_path)
    assert isinstance(refused, RowProblem) and refused.code == "batchgen.TooLarge"


def test_the_journal_hash_of_local_images_survives_moving_the_project(tmp_path):
    from batchgen.planning import row_digest
    from batchgen.prompts import PromptSpec

    digests = []
    for folder in ("one", "two"):
        root = tmp_path / folder
        root.mkdir()
        (root / "a.png").write_bytes(PNG)
        import os

        os.utime(root / "a.png", ns=(10**18, 10**18))
        messages = attach([{"role": "user", "content": "what?"}], row_images(["a.png"], root))
        body = build_body("qwen-vl-max", messages, {}, "multimodal")
        digests.append(row_digest(body, "e", PromptSpec(image_columns=("photo",), image_root=root)))
    assert digests[0] == digests[1]
    (tmp_path / "two" / "a.png").write_bytes(PNG + b"x")  # a changed file is a new request
    messages = attach([{"role": "user", "content": "what?"}], row_images(["a.png"], tmp_path / "two"))
    body = build_body("qwen-vl-max", messages, {}, "multimodal")
    spec = PromptSpec(image_columns=("photo",), image_root=tmp_path / "two")
    assert row_digest(body, "e", spec) != digests[1]


def test_a_messages_column_file_of_another_type_is_that_rows_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": (tmp_path / "notes.txt").as_uri()}}],
            }
        ]
    }
    with pytest.raises(ValueError, match="not an image type"):
        materialize(body)


def test_an_image_unreadable_at_send_time_is_not_a_final_error():
    from batchgen.client import CallOutcome
    from batchgen.results import result_of

    gone = APIError(None, "batchgen.ImageNotFound", "gone", None, Disposition.ROW_ERROR)
    result, final = result_of(CallOutcome(None, gone, 0, None, None), "m")
    assert result.status == "error" and final is False


def test_local_images_resolve_relative_to_the_table_and_carry_a_fingerprint(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(PNG)
    ref = resolve("img/a.png", tmp_path)
    assert (
        isinstance(ref, str)
        and ref.startswith("file:///")
        and ref.endswith(f"#{len(PNG)}-" + ref.split("-")[-1])
    )
    assert resolve("https://x/a.png", tmp_path) == "https://x/a.png"
    missing = resolve("img/nope.png", tmp_path)
    assert isinstance(missing, RowProblem) and missing.code == "batchgen.ImageNotFound"
    (tmp_path / "notes.txt").write_text("x")
    wrong = resolve("notes.txt", tmp_path)
    assert isinstance(wrong, RowProblem) and wrong.code == "batchgen.InvalidImage"


def test_images_go_before_the_text_of_the_last_user_message_and_are_read_at_send(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    images = row_images(["a.png", "https://x/b.jpg"], tmp_path)
    messages = attach([{"role": "system", "content": "sys"}, {"role": "user", "content": "what?"}], images)
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
    assert too_large(b"x" * (16 * 2**20)) is None
    refused = too_large(b"x" * (16 * 2**20 + 1))
    assert refused is not None and refused.disposition is Disposition.ROW_ERROR
    assert refused.code == "batchgen.TooLarge"
    assert too_large(b";base64," + b"x" * (40 * 2**20)) is None
    assert too_large(b";base64," + b"x" * (64 * 2**20)) is not None


# --- JSON mode ---------------------------------------------------------------------------


def test_json_mode_needs_the_word_json():
    assert mentions_json([{"role": "system", "content": "Answer in JSON."}])
    assert mentions_json([{"role": "user", "content": [{"image": "u"}, {"text": "give json"}]}])
    assert not mentions_json([{"role": "user", "content": "hello"}])
    config = RunConfig(api_key="k", parameters={"response_format": {"type": "json_object"}})
    problem = request_body(config, [{"role": "user", "content": "hello"}])
    assert isinstance(problem, RowProblem) and problem.code == "batchgen.NoJsonWord"


SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}}, "required": ["label"]}


def test_schema_is_sent_where_supported_else_json_mode():
    sent = response_format("qwen-plus", {}, json_mode=False, schema=SCHEMA, name="my schema!")
    assert sent == {
        "type": "json_schema",
        "json_schema": {"name": "my_schema_", "schema": SCHEMA, "strict": True},
    }
    assert response_format("qwq-plus", {}, json_mode=False, schema=SCHEMA) == {"type": "json_object"}
    assert response_format("qwen-vl-max", {}, json_mode=False, schema=SCHEMA)["type"] == "json_object"
    assert (
        response_format("qwen-vl-max", {}, json_mode=False, schema=SCHEMA, dashscope=False)["type"]
        == "json_schema"
    )  # vLLM and the like
    assert response_format("qwen-plus", {"enable_thinking": True}, json_mode=True, schema=None) == {
        "type": "json_object"
    }
    assert response_format("qwen-plus", {}, json_mode=False, schema=None) is None


def test_reply_checker():
    assert reply_checker({}, None) is None
    plain = reply_checker({"response_format": {"type": "json_object"}}, None)
    assert plain('{"a": 1}') and not plain('{"a": 1') and not plain("[1]") and not plain(None)
    shaped = reply_checker({"response_format": {"type": "json_object"}}, SCHEMA)
    assert shaped('{"label": "pos"}') and not shaped('{"label": "meh"}')
    sent = reply_checker(
        {"response_format": response_format("qwen-plus", {}, json_mode=False, schema=SCHEMA)}, None
    )
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


# --- the Caller on crafted responses -------------------------------------------------------


def call_with(respond, *, timeout: float = 1.0, stream: bool = True, attempts: int = 2):
    """One ``Caller.call`` against a handler returning crafted httpx responses."""
    import asyncio

    import httpx

    from batchgen.client import Caller
    from batchgen.ratelimit import Governor

    sent = []

    def handler(request):
        sent.append(request)
        return respond()

    async def main():
        config = RunConfig(
            api_key="sk-k",
            base_url="http://test/api/v1",
            stream=stream,
            timeout=timeout,
            max_attempts=attempts,
        )
        async with httpx.MockTransport(handler) as transport:
            caller = Caller(
                config,
                transport,
                governor=Governor(60000, adaptive=False),
                aborted=lambda: False,
                sleep=lambda s: asyncio.sleep(0),
            )
            return await caller.call(build_body("qwen-plus", [{"role": "user", "content": "hi"}], {}, "text"))

    return asyncio.run(main()), sent


SSE_HEADERS = {"content-type": "text/event-stream;charset=UTF-8", "x-request-id": "rid"}


def test_timeout_bounds_the_silence_of_a_stream_not_its_length():
    import asyncio

    import httpx

    async def trickle():
        for n in range(1, 8):  # 0.7 s in all, never 0.3 s without a chunk
            await asyncio.sleep(0.1)
            yield chunk(n, f"w{n} ", "null" if n < 7 else "stop", n)

    outcome, sent = call_with(
        lambda: httpx.Response(200, headers=SSE_HEADERS, content=trickle()), timeout=0.3
    )
    assert outcome.reply is not None and outcome.reply.content == "w1 w2 w3 w4 w5 w6 w7 "
    assert (outcome.attempts, len(sent)) == (1, 1)
    assert sent[0].headers["X-DashScope-SSE"] == "enable"
    assert json.loads(sent[0].content)["parameters"]["incremental_output"] is True

    async def stall():
        yield chunk(1, "w1", "null", 1)
        await asyncio.sleep(5)
        yield chunk(2, "", "stop", 1)

    outcome, _ = call_with(
        lambda: httpx.Response(200, headers=SSE_HEADERS, content=stall()), timeout=0.3, attempts=1
    )
    assert outcome.error is not None and outcome.error.code == "batchgen.Timeout"
    assert "nothing more of the stream" in outcome.error.message
    assert outcome.billed == (8, 1)  # what the silent stream had generated is still billed


def test_an_error_event_after_some_output_reports_what_was_billed():
    import httpx

    body = (
        RECORDED + chunk(2, " two", "null", 4) + b"id:3\nevent:error\n:HTTP_STATUS/400\n"
        b'data:{"code":"DataInspectionFailed","message":"Output data may contain '
        b'inappropriate content.","request_id":"r"}\n\n'
    )
    outcome, sent = call_with(lambda: httpx.Response(200, headers=SSE_HEADERS, content=body))
    assert outcome.error is not None and outcome.error.code == "DataInspectionFailed"
    assert outcome.billed == (8, 4) and len(sent) == 1


def test_an_empty_sse_error_keeps_the_response_headers():
    import httpx

    outcome, _ = call_with(
        lambda: httpx.Response(429, headers={**SSE_HEADERS, "retry-after": "0"}, content=b""), attempts=1
    )
    assert outcome.error is not None
    assert (outcome.error.http_status, outcome.error.request_id) == (429, "rid")
    assert outcome.error.retry_after == 0.0


def test_an_error_sent_as_sse_under_its_own_status_keeps_its_code():
    import httpx

    body = (
        b'id:1\nevent:error\ndata:{"code":"Arrearage","message":"Access denied, please make '
        b'sure your account is in good standing.","request_id":"r9"}\n\n'
    )
    outcome, sent = call_with(lambda: httpx.Response(400, headers=SSE_HEADERS, content=body))
    assert outcome.error is not None and len(sent) == 1
    assert (outcome.error.code, outcome.error.http_status) == ("Arrearage", 400)
    assert outcome.error.disposition is Disposition.FATAL


def test_events_labelled_as_json_are_still_read_as_a_stream():
    import httpx

    body = RECORDED + chunk(2, "", "stop", 1)
    outcome, sent = call_with(
        lambda: httpx.Response(200, headers={"content-type": "application/json"}, content=body)
    )
    assert outcome.reply is not None and outcome.reply.content == "1" and len(sent) == 1


def test_cut_streams_report_what_they_were_billed():
    import httpx

    outcome, sent = call_with(lambda: httpx.Response(200, headers=SSE_HEADERS, content=RECORDED), attempts=2)
    assert outcome.error is not None and outcome.error.code == "batchgen.StreamCut"
    assert outcome.billed == (16, 2) and len(sent) == 2


def test_only_the_url_parser_decides_whether_the_host_is_dashscope():
    from batchgen.config import dashscope_endpoint

    assert dashscope_endpoint("https://dashscope-intl.aliyuncs.com/compatible-mode/v1", "openai")
    assert dashscope_endpoint(None, "openai", {})  # the region's URL
    assert not dashscope_endpoint("http://localhost:8000/v1", "openai")
    for sneaky in (
        "http://evil.example#.aliyuncs.com",
        "http://evil.example/?x=.aliyuncs.com",
        "http://evil.example:80/.aliyuncs.com",
    ):
        assert not dashscope_endpoint(sneaky, "openai")
    assert not dashscope_endpoint(None, "openai", {"OPENAI_BASE_URL": "http://x/v1"})


def test_file_images_in_a_messages_column_resolve_from_the_table(tmp_path):
    from batchgen.images import local_parts

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(PNG)
    messages = [
        {"role": "user", "content": [{"image": "file:img/a.png"}, {"text": "?"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://img/a.png"}}]},
    ]
    resolved = local_parts(messages, tmp_path)
    assert isinstance(resolved, list)
    assert resolved[0]["content"][0]["image"] == resolved[1]["content"][0]["image_url"]["url"]
    assert resolved[0]["content"][0]["image"].startswith((tmp_path / "img" / "a.png").as_uri() + "#")
    missing = local_parts([{"role": "user", "content": [{"image": "file:nope.png"}]}], tmp_path)
    assert isinstance(missing, RowProblem) and missing.code == "batchgen.ImageNotFound"


def test_a_native_error_frame_on_a_compatible_mode_stream_is_that_error():
    # Recorded from the service (realbodies OS4): DashScope's gateway sends its native error
    # frame on compatible-mode streams too; it is a 429 throttle, not a cut stream.
    from batchgen.api.openai import OpenAIStream
    from batchgen.sse import SSEDecoder

    raw = (
        b'id:1\nevent:error\n:HTTP_STATUS/429\ndata:{"request_id":"70acdc21","code":'
        b'"Throttling.AllocationQuota","message":"Allocated quota exceeded, please increase your '
        b'quota limit."}\n\n'
    )
    stream = OpenAIStream(None)
    errors = [stream.add(event) for event in SSEDecoder().feed(raw)]
    error = errors[0]
    assert error is not None and error.http_status == 429
    assert error.code == "Throttling.AllocationQuota" and error.disposition is Disposition.RETRY
    assert error.request_id == "70acdc21"
