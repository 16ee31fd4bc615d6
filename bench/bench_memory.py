"""Peak memory of ``batchgen run`` as the table grows: streamed input and output keep it flat.

Writes Parquet tables of short prompts (100,000 and 1,000,000 rows by default), runs the real
CLI on each against a simulator in its own process (latency 0, no quota), and prints the
peak RSS of the batchgen process (its VmHWM, read every 50 ms) and its rate.

    python bench/bench_memory.py
    python bench/bench_memory.py --rows 10000 100000

Target (issue 5): peak RSS at 1,000,000 rows at most 1.5 × the peak at 100,000, and under 600 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import KEY, running_simulator


def high_water_mb(pid: int) -> float | None:
    """The process's peak RSS since its exec (VmHWM). Not rusage's ru_maxrss, which also
    counts the pages the child shared with this (large) parent between fork and exec."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(source: Path, out: Path, base_url: str) -> tuple[float, float]:
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY, "DASHSCOPE_HTTP_BASE_URL": base_url}
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchgen.cli",
            "run",
            str(source),
            "-o",
            str(out),
            "-c",
            "64",
            "--rpm",
            "100000000",
            "--fixed-rate",
            "--quiet",
        ],
        env=env,
    )
    peak = 0.0
    while process.poll() is None:  # VmHWM only rises: the last reading is the peak
        peak = max(peak, high_water_mb(process.pid) or 0.0)
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"batchgen exited {process.returncode}")
    return peak, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    with running_simulator(0.0) as base_url:
        print(f"batchgen memory bench: simulator latency 0, -c 64, {os.cpu_count()} cores")
        print(f"{'rows':>10} {'peak RSS MB':>12} {'wall s':>8} {'rows/s':>8}")
        peaks = {}
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
                peak, wall = run(source, out, base_url)
                check = pl.scan_parquet(out).select(pl.len(), (pl.col("status") == "ok").sum())
                total, ok = check.collect().row(0)
                assert total == rows and ok == rows, (total, ok)
                peaks[rows] = peak
                print(f"{rows:>10,} {peak:>12.0f} {wall:>8.1f} {rows / wall:>8.0f}", flush=True)
        if len(peaks) >= 2:
            small, large = min(peaks), max(peaks)
            print(f"peak at {large:,} rows / peak at {small:,} rows = {peaks[large] / peaks[small]:.2f}")


if __name__ == "__main__":
    main()
