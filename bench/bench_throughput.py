"""Throughput and client CPU of ``batchgen run`` against the simulator at a fixed latency.

The simulator runs in its own process (``batchgen simulate``) so that the CPU measured here
is the client's alone: ``time.process_time()`` of this process, all its threads included,
over the run, divided by the number of requests. Wall time is compared with the ideal
``N × latency / concurrency`` (rate limits set far above what the run needs).

    python bench/bench_throughput.py                      # concurrency 10, 100, 500
    python bench/bench_throughput.py --backend httpx      # httpx's own pool, for comparison
    python bench/bench_throughput.py --concurrency 100 --rows 5000
    python bench/bench_throughput.py --stream             # SSE answers, assembled per chunk
    python bench/bench_throughput.py --api openai         # the OpenAI-compatible route

Targets (issue 2): CPU ≤ 0.5 ms per request at concurrency 100, wall ≤ 1.15 × ideal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import polars as pl

from batchgen.config import RunConfig
from batchgen.runner import arun
from batchgen.transport import make_transport

KEY = "sk-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_simulator(latency: float) -> Iterator[str]:
    """``batchgen simulate`` in its own process, so CPU measured here is the client's; its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchgen.cli",
            "simulate",
            "--port",
            str(port),
            "--key",
            KEY,
            "--latency",
            str(latency),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5)
        except urllib.error.HTTPError:
            break  # any HTTP answer (404 here) means it is listening
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        raise SystemExit("the simulator did not start")
    try:
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


async def one_run(
    base_url: str, rows: int, concurrency: int, backend: str, *, stream: bool = False, api: str = "dashscope"
) -> tuple[float, float]:
    frame = pl.DataFrame({"prompt": [f"Benchmark prompt number {i}" for i in range(rows)]})
    if api == "openai":
        base_url = base_url.replace("/api/v1", "/compatible-mode/v1")
    config = RunConfig(
        api_key=KEY,
        base_url=base_url,
        concurrency=concurrency,
        rpm=10_000_000,
        max_attempts=1,
        timeout=60,
        stream=stream,
        api=api,
    )  # type: ignore[arg-type]
    cpu, wall = time.process_time(), time.perf_counter()
    result = await arun(frame, config, transport=make_transport(config, backend=backend))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if result.stats.ok != rows:
        raise SystemExit(f"only {result.stats.ok} of {rows} rows ok: {result.stats.error_codes}")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.5, help="simulated seconds per answer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--rows", type=int, help="rows per run [default: 10 × concurrency, at least 200]")
    parser.add_argument("--backend", choices=["aiohttp", "httpx"], default="aiohttp")
    parser.add_argument("--stream", action="store_true", help="streamed (SSE) requests")
    parser.add_argument("--api", choices=["dashscope", "openai"], default="dashscope")
    args = parser.parse_args()

    with running_simulator(args.latency) as base_url:
        print(
            f"batchgen bench: simulator latency {args.latency:g} s, backend {args.backend}, "
            f"api {args.api}{', streamed' if args.stream else ''}, "
            f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
        )
        print(
            f"{'concurrency':>11} {'rows':>6} {'wall s':>7} {'ideal s':>7} {'wall/ideal':>10} "
            f"{'CPU ms/req':>10}"
        )
        asyncio.run(one_run(base_url, 50, 10, args.backend))  # warm up imports and the server
        for concurrency in args.concurrency:
            rows = args.rows or max(200, 10 * concurrency)
            wall, cpu = asyncio.run(
                one_run(base_url, rows, concurrency, args.backend, stream=args.stream, api=args.api)
            )
            ideal = rows * args.latency / concurrency
            print(
                f"{concurrency:>11} {rows:>6} {wall:>7.2f} {ideal:>7.2f} {wall / ideal:>10.3f} "
                f"{cpu * 1000 / rows:>10.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
