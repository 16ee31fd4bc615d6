"""One rate budget shared by several processes or machines: the store that holds it.

DashScope's quotas are per account and model, shared by every key, process and host, so
runs that each pace to their own ``--rpm`` overrun it together. With a store, the
:class:`~batchgen.ratelimit.Governor`'s state (the request and token schedules, the admitted
share of each, the last cut) lives in one place and every process takes its slots from it:

- ``reserve`` hands out the next free request slot (GCRA, on the store's clock) and charges
  the request's estimated tokens; the caller sleeps until the slot. Slots are never in the
  past, so a process that idled or woke late never bursts to catch up;
- ``settle`` corrects a reservation with the real usage, ``throttled`` cuts the shared rate
  on a 429 (once per ``QUIET`` seconds, however many processes saw the same overshoot).

:class:`Schedule` is that state machine in Python, with the time passed in: the Redis store
runs the same steps as one Lua script on the Redis server's clock (``batchgen.redisstore``,
tested against this one; ``open_store`` there opens it), and a Ray job can hold a Schedule in a named actor.
:class:`batchgen.sharedrate.SharedGovernor` is the Governor that takes its slots from a store.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from batchgen.errors import UsageError
from batchgen.ratelimit import BURST, DECREASE, MIN_RPS, PROBE, QUIET, RAMP_SECONDS, START_FRACTION, TOKENS

IDLE_SECONDS = 10.0  # a budget nobody took a slot from for this long starts over: the next run ramps up
EXPIRE_SECONDS = 60.0  # and Redis drops its keys this long after the last call
PEER_SECONDS = 30.0  # a process counts as sharing the budget this long after its last slot


class StoreUnavailable(Exception):
    """The store could not be reached or answered nonsense; the message names it, never a password."""


@dataclass(frozen=True)
class Limits:
    """What one process asks of the budget: requests and tokens per second, and whether it adapts."""

    rps: float
    tps: float | None = None
    adaptive: bool = True


@dataclass(frozen=True)
class Reservation:
    """A slot: seconds to wait for it, the admitted rates now, and how many processes share them."""

    wait: float
    rps: float
    tps: float | None
    peers: int = 1


class RateStore(Protocol):
    """Where a shared budget lives. Every method may raise :class:`StoreUnavailable`."""

    async def reserve(self, limits: Limits, tokens: int, giveback: int = 0) -> Reservation:
        """The next slot for a request of ``tokens``, after returning ``giveback`` tokens of a
        slot the caller could not use (in the same step, so the refund counts for this slot)."""
        ...

    async def settle(self, limits: Limits, delta_tokens: int) -> None: ...

    async def throttled(self, limits: Limits, kind: str) -> None: ...

    async def aclose(self) -> None: ...

    @property
    def name(self) -> str:
        """Where the budget lives, for messages: never a password."""
        ...


@dataclass
class _Lane:
    """One adaptive schedule, requests or tokens: its share of the target and its next free time."""

    share: float
    climb: float
    last_cut: float = -1e9
    next: float = 0.0

    def cut(self, now: float, floor_share: float) -> None:
        if now - self.last_cut < QUIET:
            return
        self.last_cut = now
        self.share = max(floor_share, self.share * DECREASE)
        self.climb = PROBE * self.share


@dataclass
class Schedule:
    """The shared budget's state and its three operations; ``now`` is the store's clock."""

    requests: _Lane | None = None
    tokens: _Lane | None = None
    last: float = 0.0
    peers: dict[str, float] = field(default_factory=dict)

    def _load(self, now: float, limits: Limits) -> tuple[_Lane, _Lane]:
        if self.requests is None or self.tokens is None or now - self.last > IDLE_SECONDS:
            start = START_FRACTION if limits.adaptive else 1.0
            climb = (1.0 - START_FRACTION) / RAMP_SECONDS if limits.adaptive else 0.0
            self.requests, self.tokens, self.last = _Lane(start, climb), _Lane(start, climb), now
        requests, tokens = self.requests, self.tokens
        if limits.adaptive:
            elapsed = max(0.0, now - self.last)
            requests.share = min(1.0, requests.share + requests.climb * elapsed)
            tokens.share = min(1.0, tokens.share + tokens.climb * elapsed)
        self.last = now
        return requests, tokens

    def reserve(
        self, now: float, limits: Limits, tokens: int, member: str = "", giveback: int = 0
    ) -> Reservation:
        requests, lane = self._load(now, limits)
        if limits.tps and giveback > 0:
            lane.next -= giveback / (limits.tps * lane.share)
        slot = max(now, requests.next, lane.next)
        requests.next = slot + 1.0 / (limits.rps * requests.share)
        if limits.tps and tokens > 0:
            lane.next = max(slot, lane.next) + tokens / (limits.tps * lane.share)
        self.peers[member] = now
        for name, seen in list(self.peers.items()):
            if seen < now - PEER_SECONDS:
                del self.peers[name]
        return Reservation(slot - now, *self._rates(limits), peers=len(self.peers))

    def settle(self, now: float, limits: Limits, delta_tokens: int) -> None:
        _, lane = self._load(now, limits)
        if limits.tps:
            lane.next += delta_tokens / (limits.tps * lane.share)

    def throttled(self, now: float, limits: Limits, kind: str) -> None:
        requests, lane = self._load(now, limits)
        if not limits.adaptive:
            return
        if kind == TOKENS and limits.tps:
            lane.cut(now, 1.0 / limits.tps)
        else:  # requests, or the burst guard: either way, fewer requests a second
            requests.cut(now, MIN_RPS / limits.rps)
            if kind == BURST:
                requests.climb /= 2  # it punishes ramps: climb back slower

    def _rates(self, limits: Limits) -> tuple[float, float | None]:
        assert self.requests is not None and self.tokens is not None
        tps = limits.tps * self.tokens.share if limits.tps else None
        return limits.rps * self.requests.share, tps


class MemoryStore:
    """A :class:`Schedule` in this process on ``time.time()``: one budget for tasks of one
    process (tests), or the state a Ray actor holds for the actors of a job."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.schedule = Schedule()
        self._now = clock

    async def reserve(self, limits: Limits, tokens: int, giveback: int = 0) -> Reservation:
        return self.schedule.reserve(self._now(), limits, tokens, "memory", giveback)

    async def settle(self, limits: Limits, delta_tokens: int) -> None:
        self.schedule.settle(self._now(), limits, delta_tokens)

    async def throttled(self, limits: Limits, kind: str) -> None:
        self.schedule.throttled(self._now(), limits, kind)

    async def aclose(self) -> None:
        return None


def check_store_url(url: str) -> str:
    """``url`` if it names a Redis server batchgen can use, else a one-line UsageError."""
    problem = f"--rate-store {redacted(url)!r} is not a Redis URL: give redis://HOST:PORT/DB, e.g. redis://127.0.0.1:6379/0"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a port that is not a number
    except ValueError:
        raise UsageError(problem) from None
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise UsageError(problem)
    try:
        from redis.connection import parse_url
    except ImportError:
        return url  # opening the store says how to install redis-py
    try:
        parse_url(url)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{problem} ({str(exc).replace(url, redacted(url))})") from None
    return url


def redacted(url: str) -> str:
    """The URL without its password (in the user part or the query), for messages and logs."""
    try:
        parts = urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:
        return "redis://***"  # unparseable: show nothing that might be a secret
    query = "&".join(
        f"{pair.split('=', 1)[0]}=***" if pair.lower().startswith("password=") else pair
        for pair in parts.query.split("&")
    ) if parts.query else ""  # fmt: skip
    if password is not None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{parts.username or ''}:***@{host}" + (f":{port}" if port else "")
        parts = parts._replace(netloc=netloc)
    return parts._replace(query=query).geturl()


def default_rate_key(base_url: str, workspace: str | None, api_key: str, model: str) -> str:
    """The budget's name when ``--rate-key`` is not given: one per service, account and model.

    The account is the workspace when there is one, else the key (keys of one account share its
    quota, but only the key is known here); both go in as a hash, so the name never holds the
    key, and runs with different keys of one account should pass one ``--rate-key``.
    """
    host = urlsplit(base_url).netloc
    account = hashlib.sha256(f"{host}\n{workspace or ''}\n{api_key}".encode()).hexdigest()[:16]
    return f"{account}:{model}"
