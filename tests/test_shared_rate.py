"""One budget for many processes: the shared governor on a fake clock, the Lua script against its
Python twin on a real redis-server, the fallback when Redis goes away, and three real processes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import KEY, invoke, write_prompts
from redis_support import RedisServer, free_port, redis_server, redis_server_binary
from test_ratelimit import Clock, busiest_second

from batchgen.config import RunConfig
from batchgen.errors import UsageError
from batchgen.ratelimit import BURST, DECREASE, REQUESTS, TOKENS, Governor
from batchgen.ratestore import Limits, MemoryStore, Schedule, default_rate_key, redacted
from batchgen.redisstore import RedisStore
from batchgen.runner import arun
from batchgen.sharedrate import SharedGovernor
from batchgen.simulator import SimulatorConfig, SimulatorThread

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from bench_shared import measure, run_three


@pytest.fixture(scope="module")
def redis() -> RedisServer:
    if redis_server_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: .ci/run installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    with redis_server() as server:
        yield server  # type: ignore[misc]


def both(clock: Clock, rpm: float, tpm: float | None = None, adaptive: bool = True) -> list[object]:
    """The in-process governor and a shared one on a store with the same clock: one behaviour."""
    return [
        Governor(rpm, tpm, adaptive=adaptive, clock=clock, sleep=clock.sleep),
        SharedGovernor(MemoryStore(clock), rpm, tpm, adaptive=adaptive, clock=clock, sleep=clock.sleep),
    ]


async def admit(governor, clock: Clock, n: int, tokens: int = 0) -> list[float]:
    times = []
    for _ in range(n):
        await governor.acquire(tokens)
        times.append(clock.now)
        await asyncio.sleep(0)  # let a shared governor's updates land
    return times


@pytest.mark.parametrize("backend", [0, 1], ids=["in-process", "shared"])
def test_both_backends_pace_ramp_cut_and_settle_alike(backend):
    async def go() -> None:
        clock = Clock()
        governor = both(clock, 600, adaptive=False)[backend]
        times = await admit(governor, clock, 50)
        assert {round(b - a, 6) for a, b in itertools.pairwise(times)} == {0.1}

        clock = Clock()
        governor = both(clock, 600)[backend]
        times = await admit(governor, clock, 60)
        assert 3 <= sum(1 for t in times if t < times[0] + 1.0) <= 6  # a third of 10/s, climbing
        assert governor.admitted_rpm == pytest.approx(600)
        assert busiest_second(times) <= 11
        governor.throttled(REQUESTS)
        await asyncio.sleep(0)
        await admit(governor, clock, 1)
        assert governor.admitted_rpm == pytest.approx(600 * DECREASE, rel=0.01)
        governor.throttled(REQUESTS)  # the same overshoot answering: no second cut
        await admit(governor, clock, 1)
        assert governor.admitted_rpm == pytest.approx(600 * DECREASE, rel=0.01)

        clock = Clock()
        governor = both(clock, 60_000, tpm=6_000, adaptive=False)[backend]
        times = await admit(governor, clock, 3, tokens=250)  # 100 tokens a second
        assert [round(t - times[0], 6) for t in times] == [0, 2.5, 5.0]
        start = clock.now
        await admit(governor, clock, 1, tokens=1000)  # ten seconds' worth: goes alone
        assert clock.now - start == pytest.approx(2.5)
        governor.settle(1000, 100)  # used 1 s of the 10 reserved
        await asyncio.sleep(0)
        start = clock.now
        await admit(governor, clock, 1, tokens=100)
        assert clock.now - start == pytest.approx(1.0)

    asyncio.run(go())


def test_two_processes_on_one_store_split_the_rate_and_share_a_cut():
    async def go() -> None:
        clock = Clock()
        store = MemoryStore(clock)
        a, b = (SharedGovernor(store, 600, adaptive=False, clock=clock, sleep=clock.sleep) for _ in "ab")
        times: list[float] = []

        async def worker(governor: SharedGovernor) -> None:
            for _ in range(20):
                await governor.acquire()
                times.append(clock.now)

        await asyncio.gather(worker(a), worker(b))
        times.sort()
        assert busiest_second(times) <= 11  # 10 a second between them, not 10 each
        assert times[-1] - times[0] == pytest.approx(3.9)

    asyncio.run(go())
    clock = Clock()
    schedule = Schedule()
    limits = Limits(10.0, None, True)
    for _ in range(40):
        schedule.reserve(clock.now, limits, 0, "a")
        clock.now += 0.1
    schedule.throttled(clock.now, limits, BURST)  # seen by one process
    schedule.throttled(clock.now + 0.1, limits, REQUESTS)  # the same overshoot, seen by the other
    assert schedule.reserve(clock.now + 0.2, limits, 0, "b").rps == pytest.approx(10 * DECREASE, rel=0.01)


def test_a_late_head_gives_its_slot_back_instead_of_sending_on_top_of_others():
    async def go() -> None:
        clock = Clock()
        store = MemoryStore(clock)
        governor = SharedGovernor(store, 60_000, tpm=6_000, adaptive=False, clock=clock, sleep=clock.sleep)
        await governor.acquire(500)  # 5 s of tokens

        async def oversleep(seconds: float) -> None:
            clock.now += seconds + (2.0 if governor.late == 0 else 0)  # the first wake is 2 s late

        governor._sleep = oversleep  # type: ignore[method-assign]
        started = clock.now
        await governor.acquire(500)
        assert governor.late == 1
        # The abandoned slot's 500 tokens came back in the same step as the new reservation:
        # the request goes at once, and the next one 5 s after it, not 10 s.
        assert clock.now - started == pytest.approx(7.0)
        governor._sleep = clock.sleep  # type: ignore[method-assign]
        before = clock.now
        await governor.acquire(500)
        assert clock.now - before == pytest.approx(5.0)

    asyncio.run(go())


def test_an_ordinary_late_wake_sends_at_once_and_keeps_the_rate():
    async def go() -> None:
        clock = Clock()
        store = MemoryStore(clock)
        governors = [SharedGovernor(store, 6000, adaptive=False, clock=clock) for _ in range(3)]

        async def lagging(seconds: float) -> None:  # every timer fires 12 ms late
            clock.now += seconds + 0.012
            await asyncio.sleep(0)

        times: list[float] = []

        async def worker(governor: SharedGovernor) -> None:
            governor._sleep = lagging  # type: ignore[method-assign]
            for _ in range(100):
                await governor.acquire()
                times.append(clock.now)

        await asyncio.gather(*(worker(g) for g in governors))
        assert sum(g.late for g in governors) == 0
        times.sort()
        assert 300 / (times[-1] - times[0]) > 0.85 * 100  # the in-process governor's share under lag

    asyncio.run(go())


def test_the_schedule_counts_its_peers_and_starts_over_after_an_idle_gap():
    schedule, limits = Schedule(), Limits(10.0, None, True)
    assert schedule.reserve(0.0, limits, 0, "a").peers == 1
    assert schedule.reserve(1.0, limits, 0, "b").peers == 2
    assert schedule.reserve(40.0, limits, 0, "c").peers == 1  # a and b gone quiet past PEER_SECONDS
    for t in range(41, 46):
        schedule.reserve(float(t), limits, 0, "c")
    assert schedule.requests is not None and schedule.requests.share == pytest.approx(1.0)
    again = schedule.reserve(60.0, limits, 0, "d")  # nobody for more than IDLE_SECONDS: ramp again
    assert again.rps == pytest.approx(10.0 / 3)


def test_the_lua_script_is_the_python_schedule_on_the_server_clock(redis):
    async def go() -> None:
        store = RedisStore(redis.url, "twin")
        client = store._client
        twin = Schedule()
        limits = Limits(5.0, 50.0, True)
        steps = [("reserve", 30), ("reserve", 30), ("settle", -20), ("throttled", REQUESTS), ("giveback", 30)]
        steps += [("reserve", 400), ("throttled", TOKENS), ("throttled", BURST)]
        steps += [("reserve", 10), ("settle", 7)]
        for op, amount in steps:
            if op in ("reserve", "giveback"):
                got = await store.reserve(
                    limits,
                    0 if op == "giveback" else int(amount),
                    giveback=int(amount) if op == "giveback" else 0,
                )
            elif op == "settle":
                await store.settle(limits, int(amount))
            else:
                await store.throttled(limits, str(amount))
            state = {k.decode(): float(v) for k, v in (await client.hgetall(store.keys[0])).items()}
            now = state["last"]
            if op in ("reserve", "giveback"):
                tokens, back = (0, int(amount)) if op == "giveback" else (int(amount), 0)
                want = twin.reserve(now, limits, tokens, store.member, back)
                assert got.wait == pytest.approx(want.wait, abs=1e-6)
                assert (got.rps, got.tps, got.peers) == pytest.approx((want.rps, want.tps, 1))
            elif op == "settle":
                twin.settle(now, limits, int(amount))
            else:
                twin.throttled(now, limits, str(amount))
            assert twin.requests is not None and twin.tokens is not None
            assert state["rs"] == pytest.approx(twin.requests.share)
            assert state["rn"] == pytest.approx(twin.requests.next, abs=1e-6)
            assert state["ts"] == pytest.approx(twin.tokens.share)
            assert state["tn"] == pytest.approx(twin.tokens.next, abs=1e-6)
            assert state["rc"] == pytest.approx(twin.requests.climb)
        assert 0 < await client.pttl(store.keys[0]) <= 60_000  # forgotten when nobody uses it
        await store.aclose()

    asyncio.run(go())


def test_the_script_runs_on_fakeredis_too():
    fakeredis = pytest.importorskip("fakeredis")

    async def go() -> None:
        store = RedisStore("redis://fake:6379/0", "fake", client=fakeredis.FakeAsyncRedis())
        limits = Limits(10.0, None, False)
        waits = [(await store.reserve(limits, 0)).wait for _ in range(3)]
        assert waits == pytest.approx([0.0, 0.1, 0.2], abs=0.02)

    asyncio.run(go())


def test_rows_all_answered_while_redis_goes_away_and_comes_back(redis, caplog, monkeypatch):
    monkeypatch.setattr("batchgen.sharedrate.RETRY_SECONDS", 0.3)
    server = RedisServer(redis.binary, free_port(), redis.directory)
    server.start()
    frame = pl.DataFrame({"prompt": [f"question {i}" for i in range(120)]})

    async def go():
        with SimulatorThread(SimulatorConfig(key=KEY, latency=0.01)) as sim:
            config = RunConfig(
                api_key=KEY, base_url=sim.base_url, rpm=3000, rate_store=server.url, rate_key="gone"
            )
            loop = asyncio.get_running_loop()
            loop.call_later(0.6, server.stop)
            loop.call_later(1.4, server.start)
            return await arun(frame, config)

    with caplog.at_level(logging.WARNING, logger="batchgen"):
        result = asyncio.run(go())
    server.stop()
    assert result.frame["status"].to_list() == ["ok"] * 120
    messages = [r.getMessage() for r in caplog.records]
    assert any("pacing locally at 1/1 of the budget" in m and server.url in m for m in messages), messages
    assert any("answers again" in m for m in messages), messages
    assert sum("pacing locally" in m for m in messages) == 1  # one warning per outage, not per request


def test_an_unreachable_store_at_the_start_falls_back_and_hides_the_password(caplog):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    frame = pl.DataFrame({"prompt": ["a", "b", "c"]})
    with SimulatorThread(SimulatorConfig(key=KEY)) as sim, caplog.at_level(logging.WARNING, "batchgen"):
        result = asyncio.run(arun(frame, RunConfig(api_key=KEY, base_url=sim.base_url, rate_store=url)))
    assert result.frame["status"].to_list() == ["ok"] * 3
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "pacing locally at 1/3 of the budget (200 rpm)" in text  # how many share it is unknown
    assert "hunter2" not in text and ":***@127.0.0.1" in text


def test_store_urls_keys_and_messages(tmp_path):
    assert redacted("redis://user:pw@host:6380/1") == "redis://user:***@host:6380/1"
    assert redacted("redis://h:6379/0?password=pw&db=1") == "redis://h:6379/0?password=***&db=1"
    assert redacted("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    for bad in ("redis://:s3cret@127.0.0.1:badport/0", "redis://127.0.0.1:6379/0?socket_timeout=abc"):
        with pytest.raises(UsageError, match="is not a Redis URL") as caught:
            RunConfig(api_key=KEY, rate_store=bad)
        assert "s3cret" not in str(caught.value)
    intl, cn = "https://dashscope-intl.aliyuncs.com/api/v1", "https://dashscope.aliyuncs.com/api/v1"
    key = default_rate_key(intl, None, "sk-secret-key", "qwen-plus")
    assert "sk-secret" not in key and key.endswith(":qwen-plus")
    assert key != default_rate_key(cn, None, "sk-secret-key", "qwen-plus")
    with pytest.raises(UsageError, match="not a Redis URL"):
        RunConfig(api_key=KEY, rate_store="http://127.0.0.1:6379")
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    output = tmp_path / "out.csv"
    result = invoke(["run", str(source), "-o", str(output), "--simulate", "--rate-store", "localhost"])
    assert result.exit_code == 2
    assert "--rate-store 'localhost' is not a Redis URL: give redis://HOST:PORT/DB" in result.output
    assert "Traceback" not in result.output and not output.exists()


def test_three_processes_hold_one_budget(redis, tmp_path):
    rpm = 3600  # 60 a second between the three
    with SimulatorThread(SimulatorConfig(key=KEY, rpm=rpm, latency=0.1, jitter=0.05)) as sim:
        shared_budget = ["--rate-store", redis.url, "--rate-key", "three"]
        codes = run_three(sim, tmp_path, 200, rpm, shared_budget, key=KEY)
        shared = measure(sim, rpm, codes)
    assert codes == [0, 0, 0]
    assert shared.answered == 600
    assert shared.worst_second <= rpm / 60 + 1, shared
    assert shared.achieved_late_rpm >= 0.97 * rpm, shared
    assert shared.throttled == 0, shared


def test_a_job_file_shares_the_budget_too(redis, tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["a", "b", "c"])
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "{source}"\noutput = "{tmp_path / "out.csv"}"\nsimulate = true\n'
        f'rate_store = "{redis.url}"\nrate_key = "from-a-job"\n'
    )
    result = invoke(["run", "--job", str(job)])
    assert result.exit_code == 0, result.output
    assert "pacing locally" not in result.output
    ttl = asyncio.run(_ttl(redis.url, "batchgen:rate:{from-a-job}"))
    assert 0 < ttl <= 60_000  # the run took its slots from Redis, under the job's name


async def _ttl(url: str, key: str) -> int:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        return int(await client.pttl(key))
    finally:
        await client.aclose()
