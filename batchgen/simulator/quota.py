"""The requests-per-minute and tokens-per-minute quotas."""

from __future__ import annotations


class TokenBucket:
    """DashScope's requests-per-minute quota, which it enforces per second as RPM/60.

    Capacity is max(1, rpm/60) and the bucket starts full, so a burst larger than one second's
    share is throttled even well under the minute's quota: exactly what catches a client that
    paces per minute instead of per second. The clock is passed in, so the bucket can be
    tested without sleeping.
    """

    def __init__(self, rpm: int, now: float) -> None:
        self.rate = rpm / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.updated = now

    def try_take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` if there is that much; a refused request takes nothing.

        For the token quota a request may need more than a second's worth: it is let through
        when the bucket is full (the request is alone in its second) and leaves it in debt.
        """
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= amount or (amount > self.capacity and self.tokens >= self.capacity):
            self.tokens -= amount
            return True
        return False
