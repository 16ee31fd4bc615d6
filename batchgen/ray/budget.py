"""The budget a Ray job's actors share when there is no Redis: a :class:`Schedule` in a named actor.

The actor is detached and named after the budget (``batchgen-budget:{KEY}`` in the namespace
``batchgen``), so every actor of a job, and every job on the cluster with the same key, finds
the same one; its clock is the node it lives on. ``--rate-store redis://…`` replaces it.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import ray.exceptions

from batchgen.ratestore import Limits, Reservation, Schedule, StoreUnavailable

NAMESPACE = "batchgen"


class _Budget:
    """One shared :class:`Schedule`; Ray runs its calls one at a time, in order."""

    def __init__(self) -> None:
        self.schedule = Schedule()

    def reserve(self, limits: Limits, tokens: int, member: str, giveback: int = 0) -> Reservation:
        return self.schedule.reserve(time.time(), limits, tokens, member, giveback)

    def settle(self, limits: Limits, delta_tokens: int) -> None:
        self.schedule.settle(time.time(), limits, delta_tokens)

    def throttled(self, limits: Limits, kind: str) -> None:
        self.schedule.throttled(time.time(), limits, kind)


BudgetActor: Any = ray.remote(num_cpus=0, max_restarts=-1)(_Budget)


def budget_actor(key: str) -> Any:
    """The cluster's actor for budget ``key``, started if it is not there yet."""
    return BudgetActor.options(
        name=f"batchgen-budget:{key}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


class ActorStore:
    """A :class:`~batchgen.ratestore.RateStore` on a :class:`BudgetActor`."""

    name = "the job's budget actor"

    def __init__(self, handle: Any, member: str) -> None:
        self.handle = handle
        self.member = member

    async def reserve(self, limits: Limits, tokens: int, giveback: int = 0) -> Reservation:
        return await self._call(self.handle.reserve.remote(limits, tokens, self.member, giveback))

    async def settle(self, limits: Limits, delta_tokens: int) -> None:
        await self._call(self.handle.settle.remote(limits, delta_tokens))

    async def throttled(self, limits: Limits, kind: str) -> None:
        await self._call(self.handle.throttled.remote(limits, kind))

    async def _call(self, ref: Any) -> Any:
        try:
            return await ref
        except ray.exceptions.RayError as err:
            raise StoreUnavailable(f"{self.name} failed: {type(err).__name__}") from None

    async def aclose(self) -> None:
        return None
