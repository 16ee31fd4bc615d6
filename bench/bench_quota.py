"""Rate control against a simulator enforcing a quota: does batchgen use all of it, and no more?

For a quota of R requests (or T tokens) per minute, enforced per second as DashScope does:

- ``--rpm R``: no quota 429s at all, and an achieved rate of at least 97 % of R;
- ``--rpm 3R`` (a guess too high): at least 85 % of R achieved, and fewer than 5 % of the
  requests after the first 10 seconds answered 429;
- the same two with ``--tpm`` against a token quota.

Achieved rates are counted on the simulator's side: answered requests (or their tokens) per
minute from the run's first arrival to its last answer, and again after the 10 s ramp.

    python bench/bench_quota.py                 # all four, about 3 minutes
    python bench/bench_quota.py --seconds 30    # shorter runs
"""

from __future__ import annotations

import argparse
import asyncio
import time

import polars as pl

from batchgen.config import RunConfig
from batchgen.runner import arun
from batchgen.simulator import SimulatorConfig, SimulatorThread

KEY = "sk-bench"


def one(
    label: str,
    *,
    sim: SimulatorConfig,
    rows: int,
    rpm: float,
    tpm: float | None,
    concurrency: int,
    max_tokens: int | None,
) -> None:
    with SimulatorThread(sim) as server:
        frame = pl.DataFrame(
            {"prompt": [f"Give a short, plain answer to question number {i}." for i in range(rows)]}
        )
        config = RunConfig(
            api_key=KEY,
            base_url=server.base_url,
            rpm=rpm,
            tpm=tpm,
            concurrency=concurrency,
            max_attempts=20,
            timeout=30,
            parameters={"max_tokens": max_tokens} if max_tokens else {},
        )
        started = time.monotonic()
        result = asyncio.run(arun(frame, config))
        wall = time.monotonic() - started
        stats = server.stats
    first = min(stats.arrivals)
    answered = sorted(stats.answered)
    last = answered[-1][0]
    span = max(last - first, 1e-9)
    after = [(t, n) for t, n in answered if t >= first + 10]
    late_span = max(last - (first + 10), 1e-9)
    arrivals_after = sum(1 for t in stats.arrivals if t >= first + 10)
    throttled_after = sum(1 for t in stats.throttled if t >= first + 10)
    if tpm is not None:
        quota, unit = sim.tpm, "tokens/min"
        achieved = sum(n for _, n in answered) * 60 / span
        achieved_late = sum(n for _, n in after) * 60 / late_span
    else:
        quota, unit = sim.rpm, "requests/min"
        achieved = len(answered) * 60 / span
        achieved_late = len(after) * 60 / late_span
    print(
        f"{label:<34} quota {quota:>9,} {unit:<12} achieved {achieved:>10,.0f} "
        f"({achieved / quota:6.1%}); after 10 s {achieved_late:>10,.0f} "
        f"({achieved_late / quota:6.1%}) | 429s {len(stats.throttled):>4} of "
        f"{stats.requests:>5} ({len(stats.throttled) / stats.requests:5.1%}); after 10 s "
        f"{throttled_after / max(arrivals_after, 1):5.1%} | ok {result.stats.ok}/{rows} "
        f"in {wall:5.1f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45, help="length of each run at quota")
    parser.add_argument("--rpm", type=int, default=1200, help="the simulator's request quota R")
    parser.add_argument("--tpm", type=int, default=100_000, help="the simulator's token quota T")
    args = parser.parse_args()
    latency = dict(latency=0.2, jitter=0.05)
    rows = int(args.rpm / 60 * args.seconds)
    print(f"batchgen quota bench: latency 0.2 ± 0.05 s, runs of about {args.seconds:g} s at quota")
    one(
        f"--rpm R ({args.rpm})",
        sim=SimulatorConfig(key=KEY, rpm=args.rpm, **latency),
        rows=rows,
        rpm=args.rpm,
        tpm=None,
        concurrency=64,
        max_tokens=None,
    )
    one(
        f"--rpm 3R ({3 * args.rpm})",
        sim=SimulatorConfig(key=KEY, rpm=args.rpm, **latency),
        rows=rows,
        rpm=3 * args.rpm,
        tpm=None,
        concurrency=64,
        max_tokens=None,
    )
    # Token runs: about 110 tokens a request, so T/110 requests a minute; rpm out of the way.
    token_rows = int(args.tpm / 110 / 60 * args.seconds)
    one(
        f"--tpm T ({args.tpm:,})",
        sim=SimulatorConfig(key=KEY, tpm=args.tpm, **latency),
        rows=token_rows,
        rpm=100_000,
        tpm=args.tpm,
        concurrency=64,
        max_tokens=80,
    )
    one(
        f"--tpm 3T ({3 * args.tpm:,})",
        sim=SimulatorConfig(key=KEY, tpm=args.tpm, **latency),
        rows=token_rows,
        rpm=100_000,
        tpm=3 * args.tpm,
        concurrency=64,
        max_tokens=80,
    )


if __name__ == "__main__":
    main()
