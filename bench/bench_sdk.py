"""batchgen against what a user would write instead: the official SDK under a semaphore.

Both answer the same prompts from the same simulator (its own process, fixed latency). Each
contender runs in a fresh child process, so its wall time, CPU time (all threads) and peak
RSS are its own. The SDK side is the idiomatic loop::

    sem = asyncio.Semaphore(concurrency)
    async def one(prompt):
        async with sem:
            return await AioGeneration.call(model=..., messages=[...], api_key=...,
                                            result_format="message")
    await asyncio.gather(*(one(p) for p in prompts))

batchgen additionally paces, retries, journals nothing (library call) and builds the output
table. Needs the SDK: ``pip install -e '.[bench]'``.

    python bench/bench_sdk.py                       # 2,000 rows at concurrency 100
    python bench/bench_sdk.py --rows 5000 --concurrency 200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import KEY, running_simulator

PROMPT = "Give a short, plain answer to question number {i}."


def child_batchgen(base_url: str, rows: int, concurrency: int) -> None:
    import asyncio

    import polars as pl

    from batchgen.config import RunConfig
    from batchgen.runner import arun

    frame = pl.DataFrame({"prompt": [PROMPT.format(i=i) for i in range(rows)]})
    config = RunConfig(
        api_key=KEY, base_url=base_url, concurrency=concurrency, rpm=1e8, adaptive=False, max_attempts=1
    )
    result = asyncio.run(arun(frame, config))
    assert result.stats.ok == rows, result.stats.error_codes


def child_sdk(base_url: str, rows: int, concurrency: int) -> None:
    import asyncio

    import dashscope
    from dashscope import AioGeneration

    dashscope.base_http_api_url = base_url

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> str:
            async with sem:
                response = await AioGeneration.call(
                    model="qwen-plus",
                    api_key=KEY,
                    result_format="message",
                    messages=[{"role": "user", "content": PROMPT.format(i=i)}],
                )
                assert response.status_code == 200, response
                return response.output.choices[0].message.content

        replies = await asyncio.gather(*(one(i) for i in range(rows)))
        assert len(replies) == rows

    asyncio.run(main())


def child(which: str, base_url: str, rows: int, concurrency: int) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    (child_batchgen if which == "batchgen" else child_sdk)(base_url, rows, concurrency)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall": wall, "cpu": cpu, "rss": peak}))


def measure(which: str, base_url: str, rows: int, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", which, base_url, str(rows), str(concurrency)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    with running_simulator(args.latency) as base_url:
        import dashscope

        print(
            f"batchgen vs dashscope {dashscope.__version__} AioGeneration + Semaphore: "
            f"{args.rows} rows, concurrency {args.concurrency}, simulator latency "
            f"{args.latency:g} s (ideal wall {args.rows * args.latency / args.concurrency:.2f} s)"
        )
        results = {w: measure(w, base_url, args.rows, args.concurrency) for w in ("batchgen", "sdk")}
        print(f"{'':<10} {'wall s':>8} {'CPU ms/req':>11} {'peak RSS MB':>12}")
        for which, r in results.items():
            print(f"{which:<10} {r['wall']:>8.2f} {r['cpu'] * 1000 / args.rows:>11.3f} {r['rss']:>12.0f}")
        b, s = results["batchgen"], results["sdk"]
        print(
            f"{'ratio b/s':<10} {b['wall'] / s['wall']:>8.2f} {b['cpu'] / s['cpu']:>11.2f} "
            f"{b['rss'] / s['rss']:>12.2f}"
        )


if __name__ == "__main__":
    main()
