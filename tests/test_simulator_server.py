"""The simulator's lifecycle (start and stop, even while a request hangs) and its stats."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from simulator_support import (
    AUTH,
    CHAT,
    MULTIMODAL,
    SSE,
    TEXT,
    Sleeps,
    chat_body,
    text_body,
)

from batchgen.simulator import (
    Simulator,
    SimulatorConfig,
    SimulatorThread,
)

# --- lifecycle ----------------------------------------------------------------------------


def test_stop_does_not_wait_for_a_hanging_request() -> None:
    hang = Sleeps(forever=True)  # a hang that ends only when cancelled
    simulator = SimulatorThread(SimulatorConfig(fault_hang=1.0), sleep=hang)  # hangs 600 s
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
    deadline = time.monotonic() + 30
    while simulator.stats.outcomes["fault_hang"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    simulator.stop()

    assert hang.cancelled == [600.0]  # stop() returned with the hang pending, having cancelled it
    caller.join()  # the client's own timeout bounds this
    assert len(errors) == 1 and isinstance(errors[0], httpx.TransportError)
    assert not isinstance(errors[0], httpx.TimeoutException)  # the server hung up on it


def test_async_simulator_start_and_stop() -> None:
    hang = Sleeps(forever=True)  # a hang that ends only when cancelled

    async def scenario() -> tuple[str, list[float]]:
        simulator = Simulator(SimulatorConfig(fault_hang=1.0), sleep=hang)  # hangs 600 s
        base_url = await simulator.start()
        try:
            async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60) as http:
                hanging = asyncio.create_task(http.post(TEXT, json=text_body()))
                while simulator.stats.outcomes["fault_hang"] == 0:
                    await asyncio.sleep(0.01)
                await simulator.stop()
                cancelled_by_stop = list(hang.cancelled)
                with pytest.raises(httpx.TransportError) as raised:
                    await hanging
                assert not isinstance(raised.value, httpx.TimeoutException)  # the server hung up on it
        finally:
            await simulator.stop()  # a second stop is harmless
        return base_url, cancelled_by_stop

    base_url, cancelled_by_stop = asyncio.run(scenario())

    host, _, rest = base_url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    assert (host, path) == ("127.0.0.1", "api/v1")
    assert int(port) > 0
    assert cancelled_by_stop == [600.0]  # stop() returned with the hang pending, having cancelled it


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
