"""The shared rate budget in Redis: :class:`batchgen.ratestore.Schedule`'s steps as one Lua script.

Each call is one script run on the Redis server, atomic and on the server's clock (``TIME``),
so processes on machines whose clocks disagree still share one schedule. The state is a hash
``batchgen:rate:{KEY}`` (and a sorted set of the processes seen, ``...:peers``), both expiring
after ``EXPIRE_SECONDS`` untouched (the schedule itself starts over after
``IDLE_SECONDS`` without a call); the braces keep the two keys in one Redis Cluster slot.
Numbers cross as strings (Redis would truncate a Lua number to an integer).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from typing import Any

from batchgen.errors import UsageError
from batchgen.ratelimit import DECREASE, MIN_RPS, PROBE, QUIET, RAMP_SECONDS, START_FRACTION
from batchgen.ratestore import (
    EXPIRE_SECONDS,
    IDLE_SECONDS,
    PEER_SECONDS,
    Limits,
    RateStore,
    Reservation,
    StoreUnavailable,
    check_store_url,
    redacted,
)

TIMEOUT = 1.0  # seconds for a connect or a reply: a hung Redis must not hold the run

SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, rps, tps, adaptive = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local START, RAMP, DECREASE, PROBE = @START@, @RAMP@, @DECREASE@, @PROBE@
local QUIET, MIN_RPS, IDLE, PEERS, EXPIRE = @QUIET@, @MIN_RPS@, @IDLE@, @PEERS@, @EXPIRE@
local s = redis.call('HMGET', KEYS[1], 'rs', 'rc', 'rcut', 'rn', 'ts', 'tc', 'tcut', 'tn', 'last')
local rs, rc, rcut, rn, ts, tc, tcut, tn, last
if s[9] and now - tonumber(s[9]) <= IDLE then
  rs, rc, rcut, rn = tonumber(s[1]), tonumber(s[2]), tonumber(s[3]), tonumber(s[4])
  ts, tc, tcut, tn, last = tonumber(s[5]), tonumber(s[6]), tonumber(s[7]), tonumber(s[8]), tonumber(s[9])
else
  local start, climb = 1.0, 0.0
  if adaptive then start, climb = START, (1.0 - START) / RAMP end
  rs, rc, rcut, rn, ts, tc, tcut, tn, last = start, climb, -1e9, 0, start, climb, -1e9, 0, now
end
if adaptive then
  local elapsed = math.max(0, now - last)
  rs = math.min(1.0, rs + rc * elapsed)
  ts = math.min(1.0, ts + tc * elapsed)
end
local wait, peers = 0, 1
if op == 'reserve' then
  local tokens, giveback = tonumber(ARGV[5]), tonumber(ARGV[7])
  if tps > 0 and giveback > 0 then tn = tn - giveback / (tps * ts) end
  local slot = math.max(now, rn, tn)
  rn = slot + 1.0 / (rps * rs)
  if tps > 0 and tokens > 0 then tn = math.max(slot, tn) + tokens / (tps * ts) end
  wait = slot - now
  redis.call('ZADD', KEYS[2], now, ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - PEERS)
  redis.call('PEXPIRE', KEYS[2], math.floor(EXPIRE * 1000))
  peers = redis.call('ZCARD', KEYS[2])
elseif op == 'settle' then
  if tps > 0 then tn = tn + tonumber(ARGV[5]) / (tps * ts) end
elseif op == 'throttled' and adaptive then
  if ARGV[5] == 'tokens' and tps > 0 then
    if now - tcut >= QUIET then
      tcut = now
      ts = math.max(1.0 / tps, ts * DECREASE)
      tc = PROBE * ts
    end
  else
    if now - rcut >= QUIET then
      rcut = now
      rs = math.max(MIN_RPS / rps, rs * DECREASE)
      rc = PROBE * rs
    end
    if ARGV[5] == 'burst' then rc = rc / 2 end
  end
end
local function f(x) return string.format('%.17g', x) end
redis.call('HSET', KEYS[1], 'rs', f(rs), 'rc', f(rc), 'rcut', f(rcut), 'rn', f(rn),
  'ts', f(ts), 'tc', f(tc), 'tcut', f(tcut), 'tn', f(tn), 'last', f(now))
redis.call('PEXPIRE', KEYS[1], math.floor(EXPIRE * 1000))
return {f(wait), f(rps * rs), f(tps * ts), tostring(peers)}
"""
for _name, _value in {
    "START": START_FRACTION, "RAMP": RAMP_SECONDS, "DECREASE": DECREASE, "PROBE": PROBE,
    "QUIET": QUIET, "MIN_RPS": MIN_RPS, "IDLE": IDLE_SECONDS, "PEERS": PEER_SECONDS,
    "EXPIRE": EXPIRE_SECONDS,
}.items():  # fmt: skip
    SCRIPT = SCRIPT.replace(f"@{_name}@", repr(float(_value)))


class RedisStore:
    """The budget named ``key`` on the Redis server at ``url``, through ``redis.asyncio``."""

    def __init__(self, url: str, key: str, *, client: Any = None) -> None:
        try:
            import redis.asyncio
            import redis.exceptions
        except ImportError:
            raise UsageError("--rate-store needs redis-py: pip install 'batchgen[redis]'") from None
        self.name = redacted(url)
        self.keys = [f"batchgen:rate:{{{key}}}", f"batchgen:rate:{{{key}}}:peers"]
        self.member = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._client = client or redis.asyncio.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry_on_timeout=False
        )
        self._script = self._client.register_script(SCRIPT)
        self._errors = (redis.exceptions.RedisError, OSError, ValueError, IndexError)

    async def _call(self, op: str, limits: Limits, amount: int | str, giveback: int = 0) -> list[Any]:
        args = [op, repr(limits.rps), repr(limits.tps or 0.0), "1" if limits.adaptive else "0", amount]
        try:
            reply = await self._script(keys=self.keys, args=[*args, self.member, giveback])
            return [float(value) for value in reply[:3]] + [int(reply[3])]
        except self._errors as err:
            detail = str(err).strip().rstrip(".") or type(err).__name__
            raise StoreUnavailable(f"the rate store {self.name} failed: {detail}") from None

    async def reserve(self, limits: Limits, tokens: int, giveback: int = 0) -> Reservation:
        wait, rps, tps, peers = await self._call("reserve", limits, tokens, giveback)
        return Reservation(max(0.0, wait), rps, tps if limits.tps else None, int(peers))

    async def settle(self, limits: Limits, delta_tokens: int) -> None:
        await self._call("settle", limits, delta_tokens)

    async def throttled(self, limits: Limits, kind: str) -> None:
        await self._call("throttled", limits, kind)

    async def aclose(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._client.aclose()


def open_store(url: str, key: str) -> RateStore:
    """The store at ``url`` (``redis://...``) holding the budget ``key``."""
    return RedisStore(check_store_url(url), key)
