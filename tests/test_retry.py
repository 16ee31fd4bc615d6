"""The retry policy as a pure function, and the pool's use of it with the sleep injected."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest
from conftest import KEY, FakeTime

from batchgen.client import BACKOFF_MAX, backoff_seconds
from batchgen.config import RunConfig
from batchgen.runner import arun


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [
        (1, 0.375, 0.625),
        (2, 0.75, 1.25),
        (3, 1.5, 2.5),
        (4, 3.0, 5.0),
        (5, 6.0, 10.0),
        (6, 6.0, 10.0),
        (20, 6.0, 10.0),
    ],
)
def test_backoff_is_exponential_capped_with_25_percent_jitter(attempt, low, high):
    assert backoff_seconds(attempt, rand=lambda: 0.0) == pytest.approx(low)
    assert backoff_seconds(attempt, rand=lambda: 1.0) == pytest.approx(high)
    middle = min(BACKOFF_MAX, 0.5 * 2 ** (attempt - 1))
    assert backoff_seconds(attempt, rand=lambda: 0.5) == pytest.approx(middle)


def test_retry_after_is_honoured_when_longer():
    assert backoff_seconds(1, retry_after=7.0, rand=lambda: 1.0) == 7.0
    assert backoff_seconds(4, retry_after=0.1, rand=lambda: 0.5) == 4.0


def test_pool_retries_with_the_schedule_and_stops_at_max_attempts(simulator):
    sim = simulator()
    fake = FakeTime()
    frame = pl.DataFrame({"prompt": ["[sim:InternalError] always fails"]})
    config = RunConfig(api_key=KEY, base_url=sim.base_url, rpm=60000, max_attempts=5)
    result = asyncio.run(arun(frame, config, sleep=fake.sleep, clock=fake.clock))

    row = result.frame.row(0, named=True)
    assert (row["status"], row["attempts"], row["error_code"]) == ("error", 5, "InternalError")
    assert sim.stats.requests == 5
    assert len(fake.slept) == 4  # the backoffs; pacing at 60,000 rpm never had to wait
    for attempt, seconds in enumerate(fake.slept, start=1):
        base = 0.5 * 2 ** (attempt - 1)
        assert 0.75 * base <= seconds <= 1.25 * base


def test_one_attempt_means_no_retry(simulator):
    sim = simulator(fault_500=1.0)
    frame = pl.DataFrame({"prompt": ["x"]})
    config = RunConfig(api_key=KEY, base_url=sim.base_url, rpm=60000, max_attempts=1)
    result = asyncio.run(arun(frame, config))
    row = result.frame.row(0, named=True)
    assert (row["status"], row["attempts"], row["http_status"]) == ("error", 1, 500)
    assert row["error_message"].startswith("gave up after 1 attempt: ")
