"""What the simulator's tests (tests/test_simulator_*.py) share: paths, bodies, parsers, assertions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchgen.simulator import (
    DEMO_KEY,
    SimReply,
    SimulatorConfig,
    SimulatorStats,
    SimulatorThread,
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


def assert_error(response: httpx.Response, status: int, code: str, message: str) -> None:
    body = response.json()
    assert (response.status_code, body["code"], body["message"]) == (status, code, message)
    assert body["request_id"] == response.headers["x-request-id"]
    assert response.headers["content-type"] == "application/json"


class Sleeps:
    """A stand-in for the simulator's ``asyncio.sleep`` that records each delay asked for.

    It returns at once, or with ``forever`` waits until cancelled (as only ``stop()`` does) and
    records in ``cancelled`` the delays it was cancelled in. It runs on the simulator's loop;
    read it once the simulator has stopped, or while polling.
    """

    def __init__(self, *, forever: bool = False) -> None:
        self.forever = forever
        self.delays: list[float] = []
        self.cancelled: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.forever:
            try:
                await asyncio.get_running_loop().create_future()  # never set
            except asyncio.CancelledError:
                self.cancelled.append(seconds)
                raise


def post_with(
    config: SimulatorConfig, body: dict[str, Any], *, sleep: Sleeps | None = None, **client_options: Any
) -> Any:
    """Start a simulator with ``config``, send one text request, return (response or error, stats).

    ``sleep`` stands in for the simulator's ``asyncio.sleep`` (its latency and hangs)."""
    with SimulatorThread(config, sleep=sleep or asyncio.sleep) as simulator:
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


# The service's words and the request parts that tests in more than one file use.
EMPTY_MODEL = "Required parameter(s) missing or invalid, please check the request parameters."
EMPTY_INPUT = "Required input parameter missing from request."
RATE = "Requests rate limit exceeded, please try again later."
OUTPUT_INSPECTION = "Output data may contain inappropriate content."
INSPECTED = [{"role": "user", "content": "Tell me [sim:OutputInspection] things"}]
STREAM_ONLY = "This model only support stream mode, please enable the stream parameter to access the model."
THINKING_STREAM_ONLY = (
    # The real wording, as users of the service report it.
    "parameter.enable_thinking must be set to false for non-streaming calls"
)
PNG = b"\x89PNG\r\n\x1a\n pretend pixels"
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
CAT_URL = "https://example.com/cat.png"


def chat_body(model: str = "qwen-plus", messages: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI if messages is None else messages, **extra}


# The Files and Batch API (tests/test_simulator_batches*.py).

EPOCH = 1_776_000_000  # the batch clock's unix time when the simulator starts
# Ten simulated seconds validating, a line a second, five seconds finalizing.
PACE = {"batch_validation_seconds": 10, "batch_lines_per_second": 1, "batch_finalizing_seconds": 5}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
CHAT_URL = "/v1/chat/completions"  # a batch line's url and a batch's endpoint
TEST_URL = "/v1/chat/ds-test"


class BatchClock:
    """The simulator's clock in a batch test: it stands still until the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.contextmanager
def batch_api(**knobs: Any) -> Iterator[tuple[httpx.Client, SimulatorThread, BatchClock]]:
    """A simulator on a :class:`BatchClock` (batch time starts at :data:`EPOCH`, at speed 1
    unless told) and a client on its compatible base URL: ``with batch_api() as (http, sim, clock)``."""
    clock = BatchClock()
    with (
        SimulatorThread(SimulatorConfig(batch_epoch=EPOCH, **knobs), clock=clock) as simulator,
        httpx.Client(base_url=simulator.compatible_base_url, headers=AUTH, timeout=30) as http,
    ):
        yield http, simulator, clock


def batch_line(custom_id: str, text: str = "Hi there", *, url: str = CHAT_URL, **body: Any) -> dict[str, Any]:
    """An input line asking qwen-plus (unless ``model=`` says otherwise) to answer ``text``."""
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": text}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[Any]) -> bytes:
    """JSONL of ``lines``; a str or bytes line is taken as it is."""
    out = b""
    for line in lines:
        if isinstance(line, bytes):
            out += line + b"\n"
        elif isinstance(line, str):
            out += line.encode() + b"\n"
        else:
            out += json.dumps(line, ensure_ascii=False).encode() + b"\n"
    return out


def upload(http: httpx.Client, content: bytes, filename: str = "input.jsonl") -> str:
    response = http.post("/files", files={"file": (filename, content)}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_batch(
    http: httpx.Client, lines: list[Any], *, endpoint: str = CHAT_URL, window: str = "24h", **extra: Any
) -> dict[str, Any]:
    """Upload ``lines`` and create a batch of them; the create answer."""
    body = {"input_file_id": upload(http, jsonl(lines)), "endpoint": endpoint, "completion_window": window}
    response = http.post("/batches", json={**body, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def get_batch(http: httpx.Client, batch_id: str) -> dict[str, Any]:
    response = http.get(f"/batches/{batch_id}")
    assert response.status_code == 200, response.text
    return response.json()


def file_lines(http: httpx.Client, file_id: str) -> list[dict[str, Any]]:
    """The JSON lines of a result file, in the order the file has them."""
    response = http.get(f"/files/{file_id}/content")
    assert response.status_code == 200, response.text
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]


def assert_batch_error(
    response: httpx.Response,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None,
    kind: str = "invalid_request_error",
) -> None:
    """A Files or Batch API error: OpenAI's envelope with the call's request id."""
    assert (response.status_code, response.json()) == (
        status,
        {
            "error": {"message": message, "type": kind, "param": param, "code": code},
            "request_id": response.headers["x-request-id"],
        },
    )


def counts(total: int, completed: int, failed: int) -> dict[str, int]:
    """A batch's request_counts."""
    return {"total": total, "completed": completed, "failed": failed}


def run_to_end(http: httpx.Client, clock: BatchClock, batch_id: str, seconds: float = 1e4) -> dict[str, Any]:
    """The batch once ``seconds`` have passed, which must have ended it."""
    clock.advance(seconds)
    batch = get_batch(http, batch_id)
    assert batch["status"] in ("completed", "expired", "cancelled", "failed")
    return batch
