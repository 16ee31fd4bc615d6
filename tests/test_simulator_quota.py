"""The simulator's requests-per-minute quota, in its token bucket and over HTTP."""

from __future__ import annotations

import httpx
from simulator_support import (
    AUTH,
    TEXT,
    assert_error,
    text_body,
)

from batchgen.simulator import (
    SimulatorConfig,
    SimulatorThread,
    TokenBucket,
)

# --- quota --------------------------------------------------------------------------------


def test_token_bucket_enforces_rpm_per_second() -> None:
    bucket = TokenBucket(600, now=0.0)  # 10 per second, capacity 10

    assert [bucket.try_take(0.0) for _ in range(11)] == [True] * 10 + [False]
    assert bucket.try_take(0.05) is False  # half a token back, and the refusal took none
    assert bucket.try_take(0.1) is True
    assert sum(bucket.try_take(100.0) for _ in range(20)) == 10  # never more than capacity


def test_token_bucket_below_60_rpm_holds_one_request() -> None:
    bucket = TokenBucket(30, now=0.0)  # one request per 2 s

    assert [bucket.try_take(0.0), bucket.try_take(1.9), bucket.try_take(2.0)] == [True, False, True]


def test_rpm_quota_throttles_a_burst_over_http() -> None:
    with (
        # The clock stands still, so the burst is one instant however long the machine takes.
        SimulatorThread(SimulatorConfig(rpm=600), clock=lambda: 0.0) as simulator,
        httpx.Client(base_url=simulator.base_url, headers=AUTH) as http,
    ):
        responses = [http.post(TEXT, json=text_body()) for _ in range(30)]

    ok = [r for r in responses if r.status_code == 200]
    throttled = [r for r in responses if r.status_code == 429]
    # The 10 of one second at once, then nothing: no time passes for the bucket to refill.
    assert [r.status_code for r in responses] == [200] * 10 + [429] * 20
    assert len(ok) + len(throttled) == 30
    assert_error(
        throttled[0],
        429,
        "Throttling.RateQuota",
        "Requests rate limit exceeded, please try again later.",
    )
    assert simulator.stats.outcomes == {"ok": len(ok), "quota_429": len(throttled)}
    assert simulator.stats.requests == len(simulator.stats.arrivals) == 30
