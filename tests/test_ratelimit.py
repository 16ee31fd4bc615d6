"""The governor on a fake clock: pacing, ramp-up, cuts on 429s, token reservations."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from batchgen.ratelimit import BURST, DECREASE, REQUESTS, TOKENS, Governor, throttle_kind


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def admit(governor: Governor, clock: Clock, n: int, tokens: int = 0) -> list[float]:
    async def go() -> list[float]:
        times = []
        for _ in range(n):
            await governor.acquire(tokens)
            times.append(clock.now)
        return times

    return asyncio.run(go())


def busiest_second(times: list[float]) -> int:
    return max(sum(1 for t in times[i:] if t < start + 1.0 - 1e-9) for i, start in enumerate(times))


def test_fixed_rate_is_evenly_spaced_with_no_burst():
    clock = Clock()
    times = admit(Governor(600, adaptive=False, clock=clock, sleep=clock.sleep), clock, 50)
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(times)}
    assert gaps == {0.1}
    assert busiest_second(times) <= 11


def test_adaptive_start_ramps_up_from_a_third():
    clock = Clock()
    governor = Governor(600, clock=clock, sleep=clock.sleep)
    times = admit(governor, clock, 60)
    first_second = sum(1 for t in times if t < times[0] + 1.0)
    assert 3 <= first_second <= 6  # a third of 10/s, climbing
    assert governor.admitted_rpm == pytest.approx(600)  # full rate after the ramp
    assert busiest_second(times) <= 11


def test_a_throttle_cuts_once_per_overshoot_then_probes_back():
    clock = Clock()
    governor = Governor(600, adaptive=True, clock=clock, sleep=clock.sleep)
    admit(governor, clock, 60)  # past the ramp
    governor.throttled(REQUESTS)
    assert governor.admitted_rpm == pytest.approx(600 * DECREASE)
    governor.throttled(REQUESTS)  # the same overshoot answering: no second cut
    assert governor.admitted_rpm == pytest.approx(600 * DECREASE)
    clock.now += 2
    governor.throttled(REQUESTS)
    assert governor.admitted_rpm < 600 * DECREASE
    low = governor.admitted_rpm
    admit(governor, clock, 100)
    assert low < governor.admitted_rpm <= 600  # climbing back additively, never past the target


def test_token_pacing_and_a_request_larger_than_a_second():
    clock = Clock()
    governor = Governor(60_000, tpm=6_000, adaptive=False, clock=clock, sleep=clock.sleep)
    times = admit(governor, clock, 3, tokens=250)  # 100 tokens a second
    assert [round(t - times[0], 6) for t in times] == [0, 2.5, 5.0]
    start = clock.now
    admit(governor, clock, 1, tokens=1000)  # ten seconds' worth: goes alone, does not hang
    assert clock.now - start == pytest.approx(2.5)


def test_settling_refunds_what_a_reply_did_not_use():
    clock = Clock()
    governor = Governor(60_000, tpm=6_000, adaptive=False, clock=clock, sleep=clock.sleep)
    admit(governor, clock, 1, tokens=500)  # reserves 5 s
    governor.settle(500, 100)  # used 1 s worth
    start = clock.now
    admit(governor, clock, 1, tokens=100)
    assert clock.now - start == pytest.approx(1.0)


def test_output_estimate_is_a_high_percentile_capped_by_max_tokens():
    governor = Governor(600)
    assert governor.output_estimate(None, 512) == 512
    assert governor.output_estimate(200, 512) == 200
    for n in range(1, 101):
        governor.observed_output(n)
    assert 80 <= governor.output_estimate(None, 512) <= 100
    assert governor.output_estimate(50, 512) == 50


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        ("Throttling.RateQuota", "Requests rate limit exceeded, please try again later.", REQUESTS),
        ("Throttling", "Requests throttling triggered.", REQUESTS),
        ("Throttling.AllocationQuota", "Allocated quota exceeded, please increase your quota limit.", TOKENS),
        ("Throttling", "Request rate increased too quickly, please ramp up gradually.", BURST),
        ("InternalError", "boom", None),
    ],
)
def test_throttle_kinds_are_told_apart(code, message, kind):
    assert throttle_kind(code, message) == kind


def test_admit_now_takes_the_slot_acquire_would_give_without_waiting():
    """The client's fast path: the same schedule as ``acquire``, and nothing taken when not due."""

    def schedule(fast: bool) -> tuple[list[float], list[bool]]:
        clock = Clock()
        governor = Governor(600, 6000, clock=clock, sleep=clock.sleep)
        times, fast_taken = [], []

        async def go() -> None:
            for i in range(80):
                clock.now += 0.03 * (i % 5)  # sometimes due, sometimes not
                taken = fast and governor.admit_now(40)
                if not taken:
                    await governor.acquire(40)
                fast_taken.append(taken)
                times.append(clock.now)
                governor.settle(40, 25 + i % 30)

        asyncio.run(go())
        return times, fast_taken

    slow, _ = schedule(fast=False)
    fast, taken = schedule(fast=True)
    assert fast == pytest.approx(slow)
    assert any(taken) and not all(taken)  # both branches ran
    assert busiest_second(fast) <= 11


def test_admit_now_refuses_while_a_request_queues():
    clock = Clock()
    governor = Governor(600, adaptive=False, clock=clock, sleep=clock.sleep)

    async def queued() -> bool:
        async with governor._lock:  # a request waiting for its slot holds the lock
            return governor.admit_now()

    assert asyncio.run(queued()) is False
    assert governor.admit_now() is True  # due and nobody queues
    assert governor.admit_now() is False  # the next slot is 0.1 s away
