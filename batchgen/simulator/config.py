"""How the simulator is configured (:class:`SimulatorConfig`, :class:`BatchLimits`) and what it counts
(:class:`SimulatorStats`, :class:`BatchStats`)."""

from __future__ import annotations

import collections
import math
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


_MB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """The Batch API's documented limits; the defaults are the real service's.

    They are configuration so that a test can meet a limit without uploading 500 MB or
    creating a thousand batches: ``BatchLimits(list_per_minute=2)``. The per-minute limits are
    counted over the last 60 seconds of the simulator's clock (not the batch clock: they pace
    the client, not the batches), and only calls let through count.
    """

    file_bytes: int = 500 * _MB  # one uploaded file
    line_bytes: int = 6 * _MB  # one line of an input file
    lines: int = 50_000  # requests in one input file
    stored_files: int = 10_000  # files kept at once (inputs and results)
    stored_bytes: int = 100 * 1024 * _MB
    create_per_minute: int = 1000
    retrieve_per_minute: int = 1000
    list_per_minute: int = 100
    cancel_per_minute: int = 1000
    running: int = 1000  # unfinished batches at once
    # The free batch-test-model: a file of at most 100 lines and 1 MB, two unfinished batches.
    test_lines: int = 100
    test_file_bytes: int = 1 * _MB
    test_running: int = 2

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"batch limit {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """How the simulator behaves: its key, its speed, its quota and its faults.

    Probabilities are per request and drawn once against their cumulative sum, so they must
    add up to at most 1. ``seed`` makes the fault and latency draws repeatable; replies never
    depend on it (they are a pure function of the request).

    The ``batch_*`` fields drive the Files and Batch API (see ``batches``). Batches live on a
    simulated clock: the simulator's ``clock`` times ``batch_speed`` (3600 makes an hour pass in
    a second), starting at ``batch_epoch`` (unix seconds; the real time at start if None).
    In simulated seconds, a batch validates for ``batch_validation_seconds``, then sits
    ``batch_queue_seconds`` in progress with its counts still, runs ``batch_lines_per_second``
    lines, and spends ``batch_finalizing_seconds`` finalizing (or cancelling). The batch faults
    are shares, each drawn on its own: ``batch_fault_429`` of management calls answered 429,
    ``batch_fault_lost_create`` of creates whose batch is made but whose answer is lost (the
    connection drops), ``batch_fault_create_500`` of creates answered 500 having made no batch,
    ``batch_fault_line_500`` of lines that fail with a 500. The management
    calls named in ``batch_hang_after`` (``upload``, ``create``, ``file_content``, ...) take
    effect, then hang for ``hang_seconds`` before answering, the first time each: a client
    killed meanwhile has had its call carried out without learning it (the crash tests' moment).
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
    batch_speed: float = 1.0
    batch_epoch: float | None = None
    batch_validation_seconds: float = 1.0
    batch_queue_seconds: float = 0.0
    batch_lines_per_second: float = 10.0
    batch_finalizing_seconds: float = 1.0
    batch_fault_429: float = 0.0
    batch_fault_lost_create: float = 0.0
    batch_fault_create_500: float = 0.0
    batch_fault_line_500: float = 0.0
    batch_hang_after: tuple[str, ...] = ()
    batch_limits: BatchLimits = field(default_factory=BatchLimits)

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
        self._check_batch_fields()

    def _check_batch_fields(self) -> None:
        for name in ("batch_speed", "batch_lines_per_second"):
            value = getattr(self, name)
            if not 0 < value < math.inf:  # also rejects NaN
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("batch_validation_seconds", "batch_queue_seconds", "batch_finalizing_seconds"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        faults = (
            "batch_fault_429",
            "batch_fault_lost_create",
            "batch_fault_create_500",
            "batch_fault_line_500",
        )
        for name in faults:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


@dataclass
class BatchStats:
    """What the Files and Batch API saw, for tests to assert on.

    ``executed`` lists each line that ran, as (batch id, custom_id), in the order it ran: a
    line never runs twice, so a test can check that no request was paid for twice, and lines
    not run (expired, cancelled) are absent. ``created`` lists every batch made, those whose
    create answer was lost (``lost_creates``) too; ``failed_creates`` counts the creates
    answered 500 having made nothing. ``calls`` counts the management calls per
    kind (upload, file_retrieve, file_list, file_content, file_delete, create, retrieve, list,
    cancel), every call that reached the route, and ``throttled`` the 429s sent per kind.
    """

    files_uploaded: int = 0
    files_deleted: int = 0
    created: list[str] = field(default_factory=list)
    lost_creates: list[str] = field(default_factory=list)
    failed_creates: int = 0
    executed: list[tuple[str, str]] = field(default_factory=list)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    throttled: collections.Counter[str] = field(default_factory=collections.Counter)


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
    The Files and Batch API's calls count in ``requests``, ``arrivals`` and ``routes``
    ("files", "batches") but not in ``outcomes``; what they did is in ``batch``.
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
    batch: BatchStats = field(default_factory=BatchStats)
