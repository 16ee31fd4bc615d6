"""Batch mode at scale: 200,000 rows submitted and collected through the simulator's Batch API.

Writes a Parquet table of short prompts, starts ``batchgen simulate`` in its own process (its
batches validate and run at once, so nothing here waits on the batch clock), then runs the
real CLI twice on the same output, as cron would: the first run submits every row (four
files of 50,000 lines; exit 6), the second collects every batch and writes the table (exit 0).
For each run it prints the batchgen process's wall time, CPU time and peak RSS (VmHWM), for a
small table and a large one, so the memory can be compared: it stays flat, as online.
The wall time of the two runs is the client's whole time: neither run waits for a batch.

    python bench/bench_batch.py
    python bench/bench_batch.py --rows 20000 200000

Target (issue 12): peak RSS at 200,000 rows about that at 50,000 (a file of 50,000 lines is
the most batchgen holds), and the client's time a few seconds per 100,000 rows.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory import high_water_mb
from bench_throughput import KEY, free_port


@contextlib.contextmanager
def batch_simulator() -> Iterator[str]:
    """``batchgen simulate`` whose batches end as soon as they are looked at; its base URL."""
    port = free_port()
    args = [
        "--batch-validation-seconds",
        "0",
        "--batch-lines-per-second",
        "1e12",
        "--batch-finalizing-seconds",
        "0",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "batchgen.cli", "simulate", "--port", str(port), "--key", KEY, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5)
        except urllib.error.HTTPError:
            break  # any HTTP answer means it is listening
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        raise SystemExit("the simulator did not start")
    try:
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        process.terminate()
        process.wait()


def run(source: Path, out: Path, base_url: str) -> tuple[int, float, float, float]:
    """One ``batchgen run --batch``: (exit code, wall s, CPU s, peak RSS MB)."""
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY, "DASHSCOPE_HTTP_BASE_URL": base_url}
    args = ["run", str(source), "-o", str(out), "--batch", "--id-column", "id", "--quiet"]
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "batchgen.cli", *args], env=env)
    peak = 0.0
    while True:  # VmHWM only rises: the last reading before the exit is the peak
        peak = max(peak, high_water_mb(process.pid) or 0.0)
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return process.returncode, wall, usage.ru_utime + usage.ru_stime, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    args = parser.parse_args()
    print(f"batchgen batch-mode bench: simulator in its own process, {os.cpu_count()} cores")
    header = ("rows", "run", "exit", "wall s", "CPU s", "CPU µs/row", "peak RSS MB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (9, 8, 4, 7, 6, 10, 11), strict=True)))
    peaks: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            source = Path(tmp) / f"in-{rows}.parquet"
            pl.DataFrame(
                {
                    "id": [f"r{i}" for i in range(rows)],
                    "prompt": [f"Say something short about the number {i}." for i in range(rows)],
                }
            ).write_parquet(source)
            out = Path(tmp) / f"out-{rows}.parquet"
            with batch_simulator() as base_url:
                total_wall = total_cpu = 0.0
                for name, expected in (("submit", 6), ("collect", 0)):
                    code, wall, cpu, peak = run(source, out, base_url)
                    if code != expected:
                        raise SystemExit(f"the {name} run exited {code}, not {expected}")
                    total_wall, total_cpu = total_wall + wall, total_cpu + cpu
                    peaks[rows] = max(peaks.get(rows, 0.0), peak)
                    print(
                        f"{rows:>9,} {name:>8} {code:>4} {wall:>7.1f} {cpu:>6.1f} {cpu / rows * 1e6:>10.0f} "
                        f"{peak:>11.0f}",
                        flush=True,
                    )
            check = pl.scan_parquet(out).select(pl.len(), (pl.col("status") == "ok").sum())
            assert check.collect().row(0) == (rows, rows)
            per_row = total_cpu / rows * 1e6
            print(f"{rows:>9,} {'both':>8} {'':>4} {total_wall:>7.1f} {total_cpu:>6.1f} {per_row:>10.0f}")
    if len(peaks) >= 2:
        small, large = min(peaks), max(peaks)
        print(f"peak RSS at {large:,} rows / at {small:,} rows = {peaks[large] / peaks[small]:.2f}")


if __name__ == "__main__":
    main()
