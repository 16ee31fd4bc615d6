"""One ``Dialect`` per wire format: everything that differs between the native API and the
OpenAI-compatible one, in one value, so no other module asks which API a run speaks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchgen.api import native, openai
from batchgen.api.stream import StreamAssembler
from batchgen.api.types import Api, APIError, Reply, Route


@dataclass(frozen=True, slots=True)
class Dialect:
    name: Api
    body: Callable[[str, list[dict[str, Any]], Mapping[str, Any], Route], dict[str, Any]]
    path: Callable[[Route], str]  # the chat path under the base URL
    stream_headers: Mapping[str, str]  # sent with streamed requests
    streamed_body: Callable[[dict[str, Any]], dict[str, Any]]
    interpret: Callable[[int, Mapping[str, str], bytes], Reply | APIError]
    stream: Callable[[str | None], StreamAssembler]  # an assembler, given the header's request id
    messages: Callable[[dict[str, Any]], list[dict[str, Any]]]  # a body's messages


NATIVE = Dialect(
    name="dashscope",
    body=native.build_body,
    path=lambda route: native.ROUTE_PATHS[route],
    stream_headers={"Accept": "text/event-stream", "X-DashScope-SSE": "enable"},
    streamed_body=native.streamed_body,
    interpret=native.interpret,
    stream=native.NativeStream,
    messages=lambda body: body["input"]["messages"],
)
OPENAI = Dialect(
    name="openai",
    body=lambda model, messages, parameters, route: openai.build_body(model, messages, parameters),
    path=lambda route: openai.CHAT_PATH,
    stream_headers={"Accept": "text/event-stream"},
    streamed_body=openai.streamed_body,
    interpret=openai.interpret,
    stream=openai.OpenAIStream,
    messages=lambda body: body["messages"],
)
DIALECTS: dict[str, Dialect] = {"dashscope": NATIVE, "openai": OPENAI}
