"""Admitting requests as fast as the account's quota allows, and not one request faster.

DashScope sends no rate-limit headers and enforces RPM/60 and TPM/60 *per second*, with a
burst protection against sudden ramps; its quotas are shared by every key of the account, so
a configured ``--rpm`` is often a guess. The :class:`Governor` therefore

- paces requests with a generic cell rate algorithm (GCRA): each request gets the next free
  slot in O(1), one timer each, no burst (at most rate + 1 requests in any 1-second window);
- paces tokens the same way when ``--tpm`` is set: a request reserves its estimated tokens
  (input counted, output from ``max_tokens`` or a high percentile of replies seen) and settles
  with the real usage; a request larger than a second's budget goes alone, it never hangs;
- adapts: starts at a third of the target and ramps up over a few seconds, cuts the admitted
  rate multiplicatively on a throttling 429 (once per second at most, since one overshoot
  returns many 429s), then probes back up additively while replies are clean.

aiolimiter's leaky bucket cannot change its rate while requests wait, refund tokens, or admit
a request larger than its capacity, which is all of the above; so this small scheduler
replaces it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

START_FRACTION = 1 / 3  # of the target rate, at the start of a run
RAMP_SECONDS = 2.0  # from START_FRACTION to the full target, when nothing throttles
DECREASE = 0.8  # the admitted rate after a throttling 429, as a share of what it was
PROBE = 0.03  # after a throttle, climb by this share of the cut rate per second
MIN_RPS = 1 / 60  # never stall completely: one request a minute
QUIET = 0.5  # seconds after a cut during which further 429s (same overshoot) cut nothing
RECHECK = 0.05  # the head of the queue looks again this often while it waits

REQUESTS, TOKENS, BURST = "requests", "tokens", "burst"


def throttle_kind(code: str, message: str) -> str | None:
    """Which limit a 429 reports: requests per minute, tokens per minute, or the burst guard."""
    lowered = message.lower()
    if "increased too quickly" in lowered or "burst" in lowered:
        return BURST
    if (
        code in ("Throttling.AllocationQuota", "insufficient_quota")
        or "token" in lowered
        or ("allocated quota" in lowered)
    ):
        return TOKENS
    if code.startswith("Throttling") or code in ("limit_requests", "rate_limit_exceeded"):
        return REQUESTS
    return None


@dataclass
class _Rate:
    """One adaptive rate: a target, the admitted share of it, and how fast it climbs."""

    target: float  # per second
    share: float  # admitted rate = target × share
    climb: float  # share per second while clean
    last_cut: float = -1e9

    @property
    def rate(self) -> float:
        return self.target * self.share

    def grow(self, seconds: float) -> None:
        self.share = min(1.0, self.share + self.climb * seconds)

    def cut(self, now: float, floor: float) -> bool:
        if now - self.last_cut < QUIET:
            return False
        self.last_cut = now
        self.share = max(floor / self.target, self.share * DECREASE)
        self.climb = PROBE * self.share
        return True


class Pacing(Protocol):
    """What the client and the pool ask of a governor: this module's, or a shared one's
    (``batchgen.sharedrate``)."""

    throttles: dict[str, int]

    async def acquire(self, tokens: int = 0) -> None: ...

    def admit_now(self, tokens: int = 0) -> bool:
        """Take the slot ``acquire`` would give without waiting, if it would; else take nothing."""
        ...

    def settle(self, estimated: int, actual: int) -> None: ...

    def throttled(self, kind: str) -> None: ...

    def observed_output(self, tokens: int) -> None: ...

    def output_estimate(self, max_tokens: int | None, default: int) -> int: ...

    @property
    def admitted_rpm(self) -> float: ...

    @property
    def admitted_tpm(self) -> float | None: ...


class OutputEstimate:
    """The tokens to reserve for a reply, from the replies seen so far in this process."""

    def __init__(self) -> None:
        self._outputs: deque[int] = deque(maxlen=256)
        self._p90: int | None = None

    def observe(self, tokens: int) -> None:
        self._outputs.append(tokens)
        if len(self._outputs) % 32 == 1:
            ordered = sorted(self._outputs)
            self._p90 = ordered[int(0.9 * (len(ordered) - 1))]

    def estimate(self, max_tokens: int | None, default: int) -> int:
        """The 90th percentile of replies so far, capped by ``max_tokens``; before any reply,
        ``max_tokens`` or ``default``. Settling corrects it."""
        if self._p90 is not None:
            return min(self._p90, max_tokens) if max_tokens else self._p90
        return max_tokens or default


class Governor:
    """Requests per second and tokens per second for one run; see the module docstring."""

    def __init__(
        self,
        rpm: float,
        tpm: float | None = None,
        *,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        start = START_FRACTION if adaptive else 1.0
        climb = (1.0 - START_FRACTION) / RAMP_SECONDS if adaptive else 0.0
        self.requests = _Rate(rpm / 60, start, climb)
        self.tokens = _Rate(tpm / 60, start, climb) if tpm else None
        self.adaptive = adaptive
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._next_request = 0.0  # theoretical arrival time of the next request (GCRA)
        self._next_token = 0.0  # ... of the next token
        self._last = clock()
        self.throttles = {REQUESTS: 0, TOKENS: 0, BURST: 0}
        self.outputs = OutputEstimate()

    # -- admission -------------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        if self.adaptive:
            elapsed = max(0.0, now - self._last)
            self.requests.grow(elapsed)
            if self.tokens is not None:
                self.tokens.grow(elapsed)
        self._last = now

    async def acquire(self, tokens: int = 0) -> None:
        """Wait for this request's slot; ``tokens`` is its estimated input plus output.

        Requests queue on a lock and only the head waits on the clock, so each slot is spaced
        by the rate in force when it comes, not the rate when the request queued (at the start
        of a run hundreds of requests queue at once, while the rate is still ramping up).
        """
        async with self._lock:
            waited = False
            while True:  # re-check: a settled reservation may have brought the slot forward
                now = self._clock()
                due = max(self._next_request, self._next_token)
                if due <= now:
                    # After a wait, keep the schedule (timers wake a little late; spacing from
                    # the wake-up would drift below the rate). After idling, start from now.
                    slot = due if waited else now
                    break
                await self._sleep(min(due - now, RECHECK))
                waited = True
            self._take(slot, now, tokens)

    def admit_now(self, tokens: int = 0) -> bool:
        """``acquire`` when nobody queues and the slot is due: the same slot, no await (most
        requests of a run under its rate take this, at thousands a second)."""
        if self._lock.locked():
            return False
        now = self._clock()
        if max(self._next_request, self._next_token) > now:
            return False
        self._take(now, now, tokens)
        return True

    def _take(self, slot: float, now: float, tokens: int) -> None:
        self._advance(max(slot, now))
        self._next_request = slot + 1.0 / self.requests.rate
        if self.tokens is not None and tokens:
            self._next_token = max(slot, self._next_token) + tokens / self.tokens.rate

    def settle(self, estimated: int, actual: int) -> None:
        """Correct a reservation with the real usage: debt delays later requests, surplus frees them."""
        if self.tokens is not None and estimated != actual:
            self._next_token += (actual - estimated) / self.tokens.rate

    # -- feedback --------------------------------------------------------------------------
    def throttled(self, kind: str) -> None:
        self.throttles[kind] += 1
        if not self.adaptive:
            return
        now = self._clock()
        self._advance(now)
        if kind == TOKENS and self.tokens is not None:
            self.tokens.cut(now, floor=1.0)
        else:  # requests, or the burst guard: either way, fewer requests a second
            self.requests.cut(now, floor=MIN_RPS)
            if kind == BURST:
                self.requests.climb /= 2  # it punishes ramps: climb back slower

    def observed_output(self, tokens: int) -> None:
        self.outputs.observe(tokens)

    def output_estimate(self, max_tokens: int | None, default: int) -> int:
        return self.outputs.estimate(max_tokens, default)

    @property
    def admitted_rpm(self) -> float:
        return self.requests.rate * 60

    @property
    def admitted_tpm(self) -> float | None:
        return self.tokens.rate * 60 if self.tokens is not None else None
