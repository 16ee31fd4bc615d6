"""The simulator's faults (errors, drops, truncations, hangs), its latency and its config's checks."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest
from simulator_support import (
    AUTH,
    HI,
    TEXT,
    Sleeps,
    assert_error,
    post_with,
    text_body,
)

from batchgen.simulator import (
    DEMO_KEY,
    SimulatorConfig,
    SimulatorThread,
    simulated_reply,
)

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
    hang = Sleeps(forever=True)  # a hang that ends only when cancelled

    error, stats = post_with(config, text_body(), sleep=hang, timeout=0.3)

    assert isinstance(error, httpx.ReadTimeout)
    assert stats.outcomes == {"fault_hang": 1}
    assert hang.cancelled == [5.0]  # stop() did not wait out the hang: it cancelled it


def test_hang_fault_then_answers_normally() -> None:
    sleeps = Sleeps()
    response, stats = post_with(SimulatorConfig(fault_hang=1.0, hang_seconds=0.2), text_body(), sleep=sleeps)

    assert sleeps.delays == [0.2]  # the hang, waited out before the answer
    assert response.status_code == 200
    assert stats.outcomes == {"fault_hang": 1, "ok": 1}
    assert list(stats.served.values()) == [simulated_reply("qwen-plus", HI).content]


def test_latency_delays_the_answer() -> None:
    sleeps = Sleeps()
    response, _ = post_with(SimulatorConfig(latency=0.2, jitter=0.05), text_body(), sleep=sleeps)

    assert len(sleeps.delays) == 1
    assert 0.15 <= sleeps.delays[0] <= 0.25  # the latency, give or take the jitter
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
