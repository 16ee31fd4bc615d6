from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
from click.testing import CliRunner, Result
from simulator_support import AUTH

from batchgen.cli import cli
from batchgen.simulator import SimulatorConfig, SimulatorThread

ENV_VARS = (
    "DASHSCOPE_API_KEY",
    "DASHSCOPE_HTTP_BASE_URL",
    "DASHSCOPE_API_REGION",
    "DASHSCOPE_WORKSPACE_ID",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
)
KEY = "sk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's DashScope settings, and each works in its own folder."""
    for var in (
        *ENV_VARS,
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):  # the simulator is on loopback
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def simulator() -> Iterator[Callable[..., SimulatorThread]]:
    """Start simulators on free loopback ports: ``sim = simulator(latency=0.01, ...)``."""
    started: list[SimulatorThread] = []

    def start(**knobs: object) -> SimulatorThread:
        sim = SimulatorThread(SimulatorConfig(key=KEY, **knobs))  # type: ignore[arg-type]
        sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


def invoke(args: list[str], sim: SimulatorThread | None = None, *, key: str | None = KEY) -> Result:
    """Run the CLI in-process, pointed at ``sim`` through the documented environment variables."""
    env = {}
    if sim is not None:
        env["DASHSCOPE_HTTP_BASE_URL"] = sim.base_url
    if key is not None:
        env["DASHSCOPE_API_KEY"] = key
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def write_prompts(path: Path, prompts: list[str | None], **extra: list) -> Path:
    frame = pl.DataFrame({"id": [f"r{i:03d}" for i in range(len(prompts))], "prompt": prompts, **extra})
    if path.suffix == ".csv":
        frame.write_csv(path)
    elif path.suffix == ".parquet":
        frame.write_parquet(path)
    else:
        frame.write_ndjson(path)
    return path


class FakeTime:
    """A clock and a sleep for ``arun(..., clock=t.clock, sleep=t.sleep)``: pacing and backoff
    happen in fake time (each sleep moves the clock at once), only HTTP takes real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


# Shared by the simulator's own tests (tests/test_simulator_*.py).


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    """One fault-free simulator per test module, shared by the tests that only look at answers."""
    with SimulatorThread() as simulator:
        yield simulator


@pytest.fixture()
def client(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=10) as http:
        yield http
