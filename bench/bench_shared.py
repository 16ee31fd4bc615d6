"""Three batchgen processes on one account's budget: with their own --rpm each, and sharing it in Redis.

A simulator enforcing a quota of RPM requests a minute (per second, as DashScope does) serves
three ``batchgen run`` processes started at once, each with ``--rpm RPM`` (what each would be
told: the account's quota). Without a store they pace to three times the quota and fight
through 429s; with ``--rate-store`` they share one schedule in a real ``redis-server``.

Counted on the simulator's side, from each run's arrivals:
- achieved: requests answered per minute from the first arrival to the last, and again after
  the first 3 seconds (the shared ramp-up), as a share of the quota;
- worst second: the most arrivals in any 1-second window (sliding), against RPM/60 + 1;
- 429s: quota 429s the simulator sent.

    python bench/bench_shared.py                     # 3 x 1,000 rows at 6,000 rpm, about a minute
    python bench/bench_shared.py --rows 500 --rpm 3000
"""

from __future__ import annotations

import argparse
import bisect
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from redis_support import redis_server  # noqa: E402

from batchgen.simulator import SimulatorConfig, SimulatorThread  # noqa: E402

KEY = "sk-bench-shared"


@dataclass
class Shared:
    """What the simulator saw of a set of runs sharing one quota."""

    quota_rpm: float
    requests: int
    answered: int
    throttled: int
    achieved_rpm: float
    achieved_late_rpm: float
    worst_second: int
    exit_codes: list[int]

    def line(self, label: str) -> str:
        q, whole, late = self.quota_rpm, self.achieved_rpm, self.achieved_late_rpm
        return (
            f"{label:<22} quota {q:>7,.0f} rpm | achieved {whole:>7,.0f} ({whole / q:6.1%}), after 3 s "
            f"{late:>7,.0f} ({late / q:6.1%}) | worst second {self.worst_second:>4} (limit {q / 60:,.0f} + 1)"
            f" | 429s {self.throttled:>5} of {self.requests:>6} | exit {','.join(map(str, self.exit_codes))}"
        )


def worst_window(times: list[float], width: float = 1.0) -> int:
    """The most of ``times`` in any half-open window of ``width`` seconds."""
    ordered = sorted(times)
    return max((bisect.bisect_left(ordered, t + width) - i for i, t in enumerate(ordered)), default=0)


def measure(sim: SimulatorThread, quota_rpm: float, codes: list[int]) -> Shared:
    stats = sim.stats
    first = min(stats.arrivals)
    answered = sorted(t for t, _ in stats.answered)
    last = answered[-1]
    late = [t for t in answered if t >= first + 3]
    return Shared(
        quota_rpm=quota_rpm,
        requests=stats.requests,
        answered=len(answered),
        throttled=len(stats.throttled),
        achieved_rpm=len(answered) * 60 / max(last - first, 1e-9),
        achieved_late_rpm=len(late) * 60 / max(last - (first + 3), 1e-9),
        worst_second=worst_window(stats.arrivals),
        exit_codes=codes,
    )


def run_three(
    sim: SimulatorThread,
    directory: Path,
    rows: int,
    rpm: float,
    extra: list[str],
    processes: int = 3,
    key: str = KEY,
) -> list[int]:
    """``processes`` runs of ``rows`` rows each, started together; their exit codes."""
    env = {**os.environ, "DASHSCOPE_API_KEY": key, "DASHSCOPE_HTTP_BASE_URL": sim.base_url}
    children = []
    for n in range(processes):
        source = directory / f"in{n}.csv"
        lines = (f"p{n}-{i},Question {i} of run {n}?\n" for i in range(rows))
        source.write_text("id,prompt\n" + "".join(lines))
        command = [
            sys.executable, "-m", "batchgen.cli", "run", str(source), "-o", str(directory / f"out{n}.csv"),
            "--id-column", "id", "--rpm", str(rpm), "-c", "32", "--max-attempts", "20", "--fresh", *extra,
        ]  # fmt: skip
        children.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    codes = []
    for child in children:
        _, err = child.communicate(timeout=600)
        if child.returncode != 0:
            sys.stderr.write(err.decode(errors="replace")[-2000:])
        codes.append(child.returncode)
    return codes


def scenario(rows: int, rpm: float, latency: float, store: str | None, key: str) -> Shared:
    config = SimulatorConfig(key=KEY, rpm=int(rpm), latency=latency, jitter=latency / 2)
    with SimulatorThread(config) as sim, tempfile.TemporaryDirectory() as directory:
        extra = ["--rate-store", store, "--rate-key", key] if store else []
        codes = run_three(sim, Path(directory), rows, rpm, extra)
        return measure(sim, rpm, codes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows per process")
    parser.add_argument("--rpm", type=float, default=6000, help="the account's quota, given to each process")
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    print(f"3 processes x {args.rows:,} rows, quota {args.rpm:,.0f} rpm, latency {args.latency} s")
    started = time.monotonic()
    alone = scenario(args.rows, args.rpm, args.latency, None, "")
    print(alone.line("own --rpm each"), flush=True)
    with redis_server() as server:
        shared = scenario(args.rows, args.rpm, args.latency, server.url, "bench")
    print(shared.line("--rate-store (Redis)"))
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
