"""How the simulator is configured (:class:`SimulatorConfig`) and what it counts (:class:`SimulatorStats`)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal

# The one key a simulator accepts unless its config names another.
DEMO_KEY = "sk-simulator-demo-key"

FaultName = Literal["fault_429", "fault_500", "fault_drop", "fault_truncate", "fault_hang", "fault_200_error"]
# Config attribute names double as outcome names; this order is the draw's order.
_FAULT_ORDER: tuple[FaultName, ...] = (
    "fault_429",
    "fault_500",
    "fault_drop",
    "fault_truncate",
    "fault_hang",
    "fault_200_error",
)


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """How the simulator behaves: its key, its speed, its quota and its faults.

    Probabilities are per request and drawn once against their cumulative sum, so they must
    add up to at most 1. ``seed`` makes the fault and latency draws repeatable; replies never
    depend on it (they are a pure function of the request).
    """

    key: str = DEMO_KEY
    latency: float = 0.0
    jitter: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    fault_429: float = 0.0
    fault_500: float = 0.0
    fault_drop: float = 0.0
    fault_truncate: float = 0.0
    fault_hang: float = 0.0
    hang_seconds: float = 600.0
    fault_200_error: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Fail at construction, where the caller can still turn it into a usage error,
        # rather than as a mysterious behaviour under load.
        if not self.key:
            raise ValueError("key must not be empty")
        for name in ("latency", "jitter", "hang_seconds"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.rpm is not None and self.rpm < 1:
            raise ValueError(f"rpm must be >= 1 or None, got {self.rpm!r}")
        if self.tpm is not None and self.tpm < 1:
            raise ValueError(f"tpm must be >= 1 or None, got {self.tpm!r}")
        total = 0.0
        for name in _FAULT_ORDER:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
            total += value
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities add up to {total:g}, more than 1")


@dataclass
class SimulatorStats:
    """What the simulator saw and answered, for tests and benchmarks to assert on.

    ``outcomes`` counts the final outcome of each request; a hang is counted as "fault_hang"
    when it starts and again under the outcome of the answer it eventually gives, so that
    ``outcomes["ok"] == len(served)`` always holds. ``served`` maps each successful reply's
    request id to its content (streamed ones too, once their last event is written), which
    lets a test check that a result file holds exactly what was served (no lost or duplicated
    paid work). ``workspaces`` counts the ``X-DashScope-WorkSpace`` header values received,
    ``routes`` the requests per route ("text", "multimodal", "openai"), and ``streamed`` the
    answers sent as an event stream: successes, cut streams, and the native errors delivered
    as an ``event:error`` (an OpenAI stream's errors are plain JSON and do not count).
    """

    requests: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    served: dict[str, str] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)
    workspaces: collections.Counter[str] = field(default_factory=collections.Counter)
    throttled: list[float] = field(default_factory=list)  # when each quota 429 was sent
    answered: list[tuple[float, int]] = field(default_factory=list)  # (when, total tokens) per ok
    streamed: int = 0
    routes: collections.Counter[str] = field(default_factory=collections.Counter)
