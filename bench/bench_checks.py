"""What the checks made before anything is sent cost: the CSV shape pass and the resume plan.

Writes CSV tables (plain cells; every cell quoted with "" inside; a third of the cells holding
newlines), times ``open_source`` on each (the one streaming pass over the file plus polars'
own scan), then journals every row of a table and times the resume plan the next run makes
before its first request (``plan_resume``: messages, body, hash and journal verdict per row).

    python bench/bench_checks.py
    python bench/bench_checks.py --rows 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import polars as pl

from batchgen.config import RunConfig
from batchgen.journal import Journal, journal_path
from batchgen.planning import plan_resume, plan_rows
from batchgen.prompts import PromptSpec
from batchgen.results import RowResult
from batchgen.tables import open_source


def write_tables(folder: Path, rows: int) -> dict[str, Path]:
    prompts = [f"Prompt {i}: explain item {i}, briefly." for i in range(rows)]
    ids = [str(i) for i in range(rows)]
    tables = {
        "plain": pl.DataFrame({"id": ids, "prompt": [p.replace(",", "") for p in prompts]}),
        "quoted": pl.DataFrame({"id": ids, "prompt": [f'{p} say "hi"' for p in prompts]}),
        "newlines": pl.DataFrame(
            {
                "id": ids,
                "prompt": [p + ("\nsecond line" if i % 3 == 0 else "") for i, p in enumerate(prompts)],
            }
        ),
    }
    paths = {}
    for name, frame in tables.items():
        paths[name] = folder / f"{name}.csv"
        frame.write_csv(paths[name], quote_style="always" if name == "quoted" else "necessary")
    return paths


def best_of(repeats: int, work) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_tables(folder, args.rows)
        print(f"| CSV, {args.rows:,} rows | MB | open_source s (shape check + scan) |")
        print("|---|---:|---:|")
        for name, path in paths.items():
            seconds = best_of(args.repeats, lambda path=path: open_source(path))
            print(f"| {name} | {path.stat().st_size / 1e6:.0f} | {seconds:.2f} |")

        source = open_source(paths["plain"])
        config = RunConfig(api_key="bench", base_url="http://bench.invalid")
        spec = PromptSpec()
        out = folder / "out.csv"
        with Journal(journal_path(out)) as journal:
            journal.lock(out)
            journal.open()
            offset = 0
            for frame, raw in source.batches():
                planned = plan_rows(
                    frame, raw, offset, config, spec, id_column="id", endpoint="bench", lookup=None,
                    retry_errors=False,
                )  # fmt: skip
                for row in planned:
                    journal.record(row.key, row.digest, True, RowResult(status="ok", reply="x", attempts=1))
                offset += frame.height
            plan = None

            def resume() -> None:
                nonlocal plan
                plan = plan_resume(
                    source.batches(), config, spec, id_column="id", endpoint="bench", lookup=journal.lookup,
                    retry_errors=False,
                )  # fmt: skip

            seconds = best_of(args.repeats, resume)
        print()
        print(f"resume plan over {args.rows:,} journalled rows: {seconds:.2f} s "
              f"({seconds / args.rows * 1e6:.1f} µs a row); {plan.line() if plan else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
