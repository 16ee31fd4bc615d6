"""The Governor of a run that shares its account's budget with other processes, through a store.

It has the in-process :class:`~batchgen.ratelimit.Governor`'s interface, so the client and
the pool cannot tell them apart. Requests of this process queue on a lock and only the head
holds a slot from the store, so the store never holds more than one waiting reservation per
process and a cut on a 429 applies to the very next slot of every process.

A head that wakes later than ``LATE`` after its slot (a paused VM, a stopped process) gives the
slot back (its tokens with its next reservation, in one step) and takes a new one, rather than
sending on top of the slots other processes took meanwhile. An ordinary late wake-up (a busy
event loop) sends at once: each process holds one slot at a time, so it delays one request.

When the store fails (Redis down, a network partition), the run warns once and goes on with
a local Governor at its share of the budget (the target divided by the processes last seen
sharing it; a third when it never reached the store), while a probe beside the requests asks
the store again every ``RETRY_SECONDS``; no request waits on a failed store, no row is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from batchgen.ratelimit import BURST, REQUESTS, START_FRACTION, TOKENS, Governor, OutputEstimate
from batchgen.ratestore import Limits, RateStore, StoreUnavailable

log = logging.getLogger("batchgen")

LATE = 1.0  # seconds past its slot after which a request takes a new one instead (a paused VM)
RETRY_SECONDS = 5.0  # while on local pacing, ask the store again this often


class SharedGovernor:
    """Requests and tokens per second from a :class:`~batchgen.ratestore.RateStore`."""

    def __init__(
        self,
        store: RateStore,
        rpm: float,
        tpm: float | None = None,
        *,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.rpm, self.tpm, self.adaptive = rpm, tpm, adaptive
        self.limits = Limits(rpm / 60, tpm / 60 if tpm else None, adaptive)
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self.throttles = {REQUESTS: 0, TOKENS: 0, BURST: 0}
        self.outputs = OutputEstimate()
        start = START_FRACTION if adaptive else 1.0
        self._rates: tuple[float, float | None] = (self.limits.rps * start, (self.limits.tps or 0) * start)
        self.peers = 1
        self.late = 0  # slots given back because this process woke too late for them
        self.local: Governor | None = None  # while the store is unreachable
        self._reached = False  # whether the store ever answered (else the number of peers is unknown)
        self._retry_at = 0.0
        self._probing = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- admission -------------------------------------------------------------------------
    async def acquire(self, tokens: int = 0) -> None:
        async with self._lock:
            if self.local is not None:  # never wait on a store that failed: a probe asks it aside
                self._probe()
                await self.local.acquire(tokens)
                return
            giveback = 0
            while True:
                try:
                    reservation = await self.store.reserve(self.limits, tokens, giveback)
                except StoreUnavailable as err:
                    self._fall_back(err)
                    assert self.local is not None
                    await self.local.acquire(tokens)
                    return
                self._reached = True
                self._rates, self.peers = (reservation.rps, reservation.tps), reservation.peers
                if reservation.wait <= 0:
                    return
                due = self._clock() + reservation.wait
                await self._sleep(reservation.wait)
                if self._clock() - due <= LATE:
                    return
                self.late += 1  # the slot is long gone: give its tokens back with the next reservation
                giveback = tokens

    def admit_now(self, tokens: int = 0) -> bool:
        return False  # every slot is the store's to give (or the local fallback's, under the lock)

    def settle(self, estimated: int, actual: int) -> None:
        if self.limits.tps is None or estimated == actual:
            return
        if self.local is not None:
            self.local.settle(estimated, actual)
        else:
            self._send(self.store.settle(self.limits, actual - estimated))

    # -- feedback --------------------------------------------------------------------------
    def throttled(self, kind: str) -> None:
        self.throttles[kind] += 1
        if self.local is not None:
            self.local.throttled(kind)
        elif self.adaptive:
            self._send(self.store.throttled(self.limits, kind))

    def observed_output(self, tokens: int) -> None:
        self.outputs.observe(tokens)

    def output_estimate(self, max_tokens: int | None, default: int) -> int:
        return self.outputs.estimate(max_tokens, default)

    @property
    def admitted_rpm(self) -> float:
        if self.local is not None:
            return self.local.admitted_rpm
        return self._rates[0] * 60

    @property
    def admitted_tpm(self) -> float | None:
        if self.tpm is None:
            return None
        if self.local is not None:
            return self.local.admitted_tpm
        return (self._rates[1] or 0.0) * 60

    # -- the store failing and coming back -------------------------------------------------
    def _fall_back(self, err: StoreUnavailable) -> None:
        self._retry_at = self._clock() + RETRY_SECONDS
        if self.local is not None:
            return
        share = max(1, self.peers) if self._reached else round(1 / START_FRACTION)
        log.warning(
            "%s; pacing locally at 1/%d of the budget (%.0f rpm) until it answers again", err, share,
            self.rpm / share,
        )  # fmt: skip
        self.local = Governor(
            self.rpm / share, self.tpm / share if self.tpm else None, adaptive=self.adaptive,
            clock=self._clock, sleep=self._sleep,
        )  # fmt: skip
        self.local.outputs = self.outputs

    def _probe(self) -> None:
        """Ask the failed store again, beside the requests, once ``RETRY_SECONDS`` have passed."""
        if self._probing or self._clock() < self._retry_at:
            return
        self._probing = True

        async def probe() -> None:
            try:
                reservation = await self.store.reserve(self.limits, 0)
            except StoreUnavailable:
                self._retry_at = self._clock() + RETRY_SECONDS
            else:
                self._reached, self.peers = True, reservation.peers
                log.warning("the rate store %s answers again: sharing its budget", self.store.name)
                self.local = None
            finally:
                self._probing = False

        self._send(probe())

    def _send(self, call: Coroutine[Any, Any, None]) -> None:
        """Run a store update beside the request; a failure only switches to local pacing."""
        task = asyncio.ensure_future(self._quietly(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, call: Coroutine[Any, Any, None]) -> None:
        try:
            await call
        except StoreUnavailable as err:
            self._fall_back(err)

    async def aclose(self) -> None:
        """Finish the updates in flight and close the store's connections."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.aclose()
