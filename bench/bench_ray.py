"""The same rows through one ``batchgen run`` process and through ``--engine ray``, on this machine.

The simulator runs in its own process at a fixed latency with no quota; both runs keep the same
number of requests in flight (one process with ``-c A×C``, Ray with A actors of ``-c C``) and
a rate far above what they need, so the difference is the engine's own cost: Ray's start
(a local cluster, its actors), its scheduling and the journals merged, against one event loop.
Wall time is the whole command, from start to the output written; the output of both is
checked to be the same rows, in the same order, every one answered.

    python bench/bench_ray.py                         # 20,000 rows, 2 actors x 32, about a minute
    python bench/bench_ray.py --rows 50000 --actors 2 --concurrency 64
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


def run(base_url: str, source: Path, output: Path, *extra: str) -> float:
    env = {**os.environ, "DASHSCOPE_HTTP_BASE_URL": base_url, "DASHSCOPE_API_KEY": KEY}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    command = [
        sys.executable, "-m", "batchgen", "run", str(source), "-o", str(output), "--id-column", "id",
        "--rpm", "600000", "-q", *extra,
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(extra) or 'local'} run failed ({done.returncode}): {done.stderr[-1500:]}"
        )
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per actor")
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    in_flight = args.actors * args.concurrency
    ideal = args.rows * args.latency / in_flight
    with running_simulator(args.latency) as base, tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        source = folder / "in.csv"
        ids = [f"r{i}" for i in range(args.rows)]
        pl.DataFrame({"id": ids, "prompt": [f"Benchmark prompt {i}" for i in range(args.rows)]}).write_csv(
            source
        )
        local = run(base, source, folder / "local.parquet", "-c", str(in_flight))
        ray = run(
            base, source, folder / "ray.parquet", "--engine", "ray", "--ray-actors", str(args.actors),
            "-c", str(args.concurrency),
        )  # fmt: skip
        one, other = pl.read_parquet(folder / "local.parquet"), pl.read_parquet(folder / "ray.parquet")
        assert one["id"].to_list() == other["id"].to_list() == ids
        assert set(one["status"]) == set(other["status"]) == {"ok"}
        assert one.columns == other.columns
    print(
        f"{args.rows:,} rows, {in_flight} in flight, latency {args.latency} s "
        f"(ideal {ideal:.1f} s), {os.cpu_count()} cores"
    )
    print(f"{'engine':<34} {'wall s':>8} {'rows/s':>8} {'wall / ideal':>13}")
    for label, wall in (
        (f"one process, -c {in_flight}", local),
        (f"--engine ray, {args.actors} x -c {args.concurrency}", ray),
    ):
        print(f"{label:<34} {wall:>8.1f} {args.rows / wall:>8,.0f} {wall / ideal:>13.2f}")


if __name__ == "__main__":
    main()
