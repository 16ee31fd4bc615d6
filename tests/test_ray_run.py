"""``batchgen run --engine ray`` on a local Ray started by the run: 5,000 rows through faults on one
shared budget, a driver killed with SIGKILL and run again, and the refusals."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import KEY, invoke, write_prompts

from batchgen.simulator import SimulatorConfig, SimulatorThread

pytest.importorskip("ray", reason="--engine ray needs pip install 'batchgen[ray]'")

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from bench_shared import worst_window


@pytest.fixture()
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Runs a test started; killed with their process group (their local Ray) if still running."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def spawn(
    sim: SimulatorThread, directory: Path, rows: int, *extra: str, into: list[subprocess.Popen[str]]
) -> subprocess.Popen[str]:
    source = directory / "in.csv"
    if not source.exists():
        write_prompts(source, [f"Question {i}: what is {i} + {i}?" for i in range(rows)])
    env = {
        **os.environ, "DASHSCOPE_HTTP_BASE_URL": sim.base_url, "DASHSCOPE_API_KEY": KEY,
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }  # fmt: skip
    command = [
        sys.executable, "-m", "batchgen", "run", str(source), "-o", str(directory / "out.parquet"),
        "--id-column", "id", "--engine", "ray", "--max-attempts", "20", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    into.append(process)
    return process


def journalled(directory: Path) -> int:
    """Rows the actors have committed so far, over every actor journal."""
    total = 0
    for path in (directory / "out.parquet.ray-journals").glob("actor-*.sqlite"):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
                total += db.execute("SELECT count(*) FROM rows").fetchone()[0]
        except sqlite3.Error:
            pass  # created, not yet initialised
    return total


def test_five_thousand_rows_through_faults_on_one_budget_in_input_order(tmp_path, spawned):
    rpm = 30_000  # the account's quota, enforced by the simulator per second: 500 a second
    faults = SimulatorConfig(key=KEY, latency=0.02, rpm=rpm, fault_500=0.02, fault_429=0.01, fault_drop=0.01)
    with SimulatorThread(faults) as sim:
        # --fixed-rate: the faults' 429s would otherwise slow the shared rate (as real ones must).
        run = spawn(
            sim,
            tmp_path,
            5000,
            "--rpm",
            str(rpm),
            "--fixed-rate",
            "-c",
            "32",
            "--ray-actors",
            "2",
            into=spawned,
        )
        _, err = run.communicate(timeout=240)
        stats = sim.stats
    assert run.returncode == 0, err
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"r{i:03d}" for i in range(5000)]  # input order, every row
    assert set(out["status"]) == {"ok"}
    served = stats.served
    assert len(served) == 5000  # every row paid once: faults were retried, nothing answered twice
    assert all(served[rid] == reply for rid, reply in zip(out["request_id"], out["reply"], strict=True))
    # Both actors paced from one budget: the quota's 429s are rare, no second far past it.
    assert len(stats.throttled) < 50, len(stats.throttled)
    assert worst_window(stats.arrivals) <= rpm / 60 * 1.1, worst_window(stats.arrivals)
    assert "Traceback" not in err and KEY not in err
    assert not list((tmp_path / "out.parquet.ray-journals").glob("actor-*"))  # merged, then removed


def test_a_driver_killed_mid_run_and_restarted_resends_at_most_what_was_in_flight(tmp_path, spawned):
    concurrency, actors = 8, 2
    with SimulatorThread(SimulatorConfig(key=KEY, latency=0.05)) as sim:
        options = ("--rpm", "12000", "-c", str(concurrency), "--ray-actors", str(actors))
        first = spawn(sim, tmp_path, 1500, *options, into=spawned)
        deadline = time.monotonic() + 120
        while journalled(tmp_path) < 300:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the actors never journalled 300 rows"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.communicate()
        settled = time.monotonic() + 30  # the actors die with the driver's Ray: wait until they stop
        before = -1
        while before != (now := len(sim.stats.served)) and time.monotonic() < settled:
            before = now
            time.sleep(1.0)
        finished = journalled(tmp_path)
        assert 300 <= finished < 1500
        again = spawn(sim, tmp_path, 1500, *options, into=spawned)
        _, err = again.communicate(timeout=240)
        served = len(sim.stats.served)
    assert again.returncode == 0, err
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"r{i:03d}" for i in range(1500)] and set(out["status"]) == {"ok"}
    # Paid again: only the answers served to the killed run that its actors had not yet committed:
    # what each had in flight, and what it finished in its journal's last 50 ms commit window (at
    # concurrency / latency rows a second; the slack is the durable kill -9 test's, for a loaded box).
    window, slack, latency = 0.05, 0.2, 0.05
    assert served - 1500 <= actors * (concurrency + concurrency / latency * (window + slack)), served


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch"], "--engine ray and --batch do not go together"),
        (["--messages-column", "prompt"], "--engine ray does not take --messages-column yet"),
        (["--engine", "spark"], "Invalid value for '--engine'"),
        (["--engine", "local", "--journal-dir", "j"], "--journal-dir is for Ray: add --engine ray"),
        (["--engine", "local", "--ray-actors", "4"], "--ray-actors is for Ray: add --engine ray"),
    ],
)
def test_refusals_are_one_line(tmp_path, extra, message):
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    result = invoke(
        ["run", str(source), "-o", str(tmp_path / "out.csv"), "--simulate", "--engine", "ray", *extra]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.csv").exists()


def test_without_ray_installed_the_message_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    result = invoke(["run", str(source), "-o", str(tmp_path / "out.csv"), "--simulate", "--engine", "ray"])
    assert result.exit_code == 2, result.output
    assert "--engine ray needs Ray: pip install 'batchgen[ray]'" in result.output


@pytest.fixture(scope="module")
def local_ray() -> Iterator[object]:
    """One local Ray for this module's in-process tests: loopback, two CPUs, no dashboard."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_the_library_maps_a_dataset_and_never_pays_a_journalled_row_twice(local_ray, tmp_path):
    import batchgen.ray
    from batchgen.config import RunConfig

    rows = 600
    ids, prompts = [f"k{i}" for i in range(rows)], [f"question {i}" for i in range(rows)]
    frame = pl.DataFrame({"id": ids, "prompt": prompts})
    blocks = [frame.slice(i, 150).to_arrow() for i in range(0, rows, 150)]
    with SimulatorThread(SimulatorConfig(key=KEY, latency=0.01, fault_500=0.05)) as sim:
        config = RunConfig(api_key=KEY, base_url=sim.base_url, rpm=60_000, concurrency=16)

        def answer() -> pl.DataFrame:
            ds = local_ray.data.from_arrow(blocks)
            answered = batchgen.ray.answer_dataset(ds, config, key_column="id", journal_dir=tmp_path / "j")

            parts = [pl.from_arrow(local_ray.get(ref)) for ref in answered.to_arrow_refs()]
            return pl.concat(parts).sort("id")  # Ray's order is its own

        first = answer()
        paid = len(sim.stats.served)
        second = answer()  # new actors, new journals: the old ones still answer every row
        assert len(sim.stats.served) == paid == rows
    assert set(first["status"]) == {"ok"} and first.height == rows
    assert second.select("id", "reply").equals(first.select("id", "reply"))
    assert len(list((tmp_path / "j").glob("actor-*.sqlite"))) >= 2
