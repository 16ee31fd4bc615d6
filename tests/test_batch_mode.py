"""Batch mode end to end: ``batchgen run --batch`` against the simulator's Batch API.

The simulator runs its batches on a :class:`BatchClock` the tests advance, so a batch is
validating, running or ended exactly when a test says; nothing here waits in real time but
the crash tests, which kill a real ``batchgen`` process while the simulator holds a call.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
from conftest import KEY, invoke, write_prompts
from simulator_support import EPOCH, BatchClock

from batchgen.batch import mode
from batchgen.batch.lines import MISSING, unanswered
from batchgen.batch.remote import RemoteBatch
from batchgen.batch.store import ChunkRow
from batchgen.journal import journal_path
from batchgen.simulator import SimulatorConfig, SimulatorThread

IDS = [f"r{i:03d}" for i in range(12)]
PROMPTS = [f"Question {i}: name a colour." for i in range(12)]
DAY = 86_400


@pytest.fixture
def batch_sim(monkeypatch) -> Iterator[Callable[..., tuple[SimulatorThread, BatchClock]]]:
    started: list[SimulatorThread] = []

    def start(**knobs: object) -> tuple[SimulatorThread, BatchClock]:
        clock = BatchClock()
        monkeypatch.setattr(mode, "now", lambda: EPOCH + clock())  # the client's clock is the service's
        config = SimulatorConfig(key=KEY, batch_epoch=EPOCH, **knobs)  # type: ignore[arg-type]
        sim = SimulatorThread(config, clock=clock)
        sim.start()
        started.append(sim)
        return sim, clock

    yield start
    for sim in started:
        sim.stop()


def batch_run(sim: SimulatorThread, *extra: str, out: str = "out.csv"):
    return invoke(["run", "in.csv", "-o", out, "--batch", "--id-column", "id", *extra], sim)


def read(out: str = "out.csv") -> pl.DataFrame:
    return pl.read_csv(out, infer_schema_length=0)


def stored_files(sim: SimulatorThread) -> list[dict]:
    url = sim.base_url.replace("/api/v1", "/compatible-mode/v1/files")
    return httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).json()["data"]


def spawn_batch_run(sim: SimulatorThread, *extra: str) -> subprocess.Popen[str]:
    """``batchgen run --batch`` as its own process, for tests that signal or kill it."""
    env = {**os.environ, "DASHSCOPE_HTTP_BASE_URL": sim.base_url, "DASHSCOPE_API_KEY": KEY}
    args = [
        sys.executable,
        "-m",
        "batchgen",
        "run",
        "in.csv",
        "-o",
        "out.csv",
        "--batch",
        "--id-column",
        "id",
    ]
    return subprocess.Popen(
        [*args, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(process: subprocess.Popen[str], reached: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not reached():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.02)


def executed(sim: SimulatorThread) -> Counter[str]:
    return Counter(custom_id for _, custom_id in sim.stats.batch.executed)


def test_submit_then_collect_answers_every_row_once_at_batch_price(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS)

    first = batch_run(sim)
    assert first.exit_code == 6, first.stderr
    out = read()
    assert out["id"].to_list() == IDS and set(out["status"]) == {"pending"}
    assert out["batch_id"].n_unique() == 1 and out["batch_id"][0].startswith("batch_")
    assert set(out["billing_mode"]) == {"batch"} and out["reply"].null_count() == 12
    assert "12 pending" in first.stderr

    again = batch_run(sim)  # still validating: nothing is sent again
    assert again.exit_code == 6 and read()["status"].to_list() == ["pending"] * 12
    assert len(sim.stats.batch.created) == 1 and sim.stats.batch.files_uploaded == 1

    clock.advance(DAY / 2)
    done = batch_run(sim)
    assert done.exit_code == 0, done.stderr
    out = read()
    assert out["id"].to_list() == IDS and set(out["status"]) == {"ok"}
    assert set(out["billing_mode"]) == {"batch"} and out["batch_id"].n_unique() == 1
    assert executed(sim) == Counter(IDS)  # each line ran once
    assert stored_files(sim) == []  # input and output files deleted once collected

    online = invoke(["run", "in.csv", "-o", "online.csv", "--api", "openai", "--id-column", "id"], sim)
    assert online.exit_code == 0
    assert read("online.csv")["reply"].to_list() == out["reply"].to_list()  # the same answers

    # Half the real-time price: qwen-plus 0.40 / 1.20 per 1M tokens, halved.
    tokens_in = sum(int(v) for v in out["input_tokens"])
    tokens_out = sum(int(v) for v in out["output_tokens"])
    expected = (tokens_in * 0.40 + tokens_out * 1.20) / 2 / 1e6
    assert f"${expected:.4f} spent" in done.stderr
    report = invoke(["cost", "out.csv", "online.csv", "--by", "billing_mode", "--format", "json"])
    costs = {
        g["billing_mode"]: float(g["cost_usd"]) for g in __import__("json").loads(report.stdout)["groups"]
    }
    assert costs["batch"] == pytest.approx(expected) and costs["online"] == pytest.approx(2 * expected)

    assert batch_run(sim).exit_code == 0  # nothing left: no new batch
    assert len(sim.stats.batch.created) == 1


def test_wait_with_the_simulator_finishes_in_one_command(tmp_path):
    write_prompts(tmp_path / "in.csv", PROMPTS)
    result = invoke(["run", "in.csv", "-o", "out.csv", "--batch", "--wait", "--simulate"], key=None)
    assert result.exit_code == 0, result.stderr
    assert set(read()["status"]) == {"ok"} and "collected batch" in result.stderr


def test_expired_batch_keeps_what_finished_and_the_rest_go_in_a_new_batch_next_run(batch_sim, tmp_path):
    # Four lines run before the 24 h deadline (one every 20,000 s), the others expire.
    sim, clock = batch_sim(batch_validation_seconds=0, batch_lines_per_second=1 / 20_000)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim).exit_code == 6
    clock.advance(DAY + 10)
    collected = batch_run(sim)
    assert collected.exit_code == 3, collected.stderr  # leftovers are errors until the next run
    out = read()
    assert out["status"].to_list().count("ok") == 4
    leftovers = out.filter(pl.col("status") == "error")
    assert set(leftovers["error_code"]) == {"batch_expired"} and leftovers.height == 8
    assert set(leftovers["attempts"]) == {"0"} and leftovers["input_tokens"].null_count() == 8
    assert len(sim.stats.batch.created) == 1  # not sent again in the run that collected them

    assert batch_run(sim).exit_code == 6  # the next run: a new batch of the 8 only
    assert len(sim.stats.batch.created) == 2
    rounds = 0
    while set(read()["status"]) != {"ok"} and rounds < 10:  # 4 lines a day: collect, resubmit, ...
        clock.advance(DAY + 10)
        batch_run(sim)
        rounds += 1
    assert executed(sim) == Counter(IDS)  # no row paid twice
    assert set(read()["status"]) == {"ok"}


def test_cancelled_batch_with_online_fallback_sends_the_rest_online(batch_sim, tmp_path):
    sim, clock = batch_sim(batch_validation_seconds=0, batch_lines_per_second=1 / 100)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim).exit_code == 6
    clock.advance(350)  # three lines done
    listed = invoke(["batch", "status", "out.csv"])  # no base URL given: the one the journal recorded
    assert listed.exit_code == 0 and "in_progress" in listed.stdout and "3 done" in listed.stdout, (
        listed.stdout
    )
    cancelled = invoke(["batch", "cancel", "out.csv"], sim)
    assert cancelled.exit_code == 0 and "cancelling" in cancelled.stdout
    twice = invoke(["batch", "cancel", "out.csv"], sim)  # already cancelling: asked once is enough
    assert twice.exit_code == 0 and "cancelling" in twice.stdout and sim.stats.batch.calls["cancel"] == 1
    clock.advance(60)
    result = batch_run(sim, "--batch-fallback", "online")
    assert result.exit_code == 0, result.stderr
    out = read()
    assert set(out["status"]) == {"ok"}
    modes = Counter(out["billing_mode"])
    assert modes == {"batch": 3, "online": 9}
    assert sim.stats.outcomes["ok"] == 9  # the online calls: only the rows the batch never ran
    assert executed(sim) == Counter(out.filter(pl.col("billing_mode") == "batch")["id"].to_list())


def test_fallback_none_leaves_rows_a_batch_did_not_run_as_errors(batch_sim, tmp_path):
    sim, clock = batch_sim(batch_validation_seconds=0, batch_lines_per_second=1 / 100)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim, "--batch-fallback", "none").exit_code == 6
    clock.advance(250)
    assert invoke(["batch", "cancel", "out.csv"], sim).exit_code == 0
    clock.advance(60)
    for _ in range(2):  # collecting, and one more run: nothing is sent again
        result = batch_run(sim, "--batch-fallback", "none")
        assert result.exit_code == 3
        out = read()
        assert Counter(out["status"]) == {"ok": 2, "error": 10}
        assert set(out.filter(pl.col("status") == "error")["error_code"]) == {"batch_cancelled"}
    assert len(sim.stats.batch.created) == 1
    again = batch_run(sim, "--batch-fallback", "none", "--retry-errors")  # as the README says
    assert again.exit_code == 6 and len(sim.stats.batch.created) == 2
    clock.advance(DAY)
    assert batch_run(sim, "--batch-fallback", "none").exit_code == 0 and executed(sim) == Counter(IDS)
    assert sim.stats.outcomes["ok"] == 0  # never online


def test_a_refused_line_is_kept_and_never_sent_again(batch_sim, tmp_path):
    prompts = [*PROMPTS[:10], "Tell me [sim:DataInspectionFailed]", "Fine"]
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", prompts)
    assert batch_run(sim).exit_code == 6
    clock.advance(DAY / 2)
    for _ in range(2):  # collecting it, then a run that has nothing to send
        assert batch_run(sim).exit_code == 3
        out = read()
        assert out.filter(pl.col("status") != "ok")["id"].to_list() == ["r010"]
        refused = out.row(10, named=True)
        assert (refused["error_code"], refused["http_status"]) == ("data_inspection_failed", "400")
        assert refused["billing_mode"] == "batch" and refused["batch_id"] == out["batch_id"][0]
    assert len(sim.stats.batch.created) == 1


def test_lines_that_failed_transiently_go_in_the_next_batch(batch_sim, tmp_path):
    sim, clock = batch_sim(batch_fault_line_500=0.4, seed=3)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim).exit_code == 6
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 3
    failed = read().filter(pl.col("error_code") == "internal_error")
    assert failed.height > 0 and set(failed["http_status"]) == {"500"}
    rounds = 0
    while set(read()["status"]) != {"ok"} and rounds < 20:
        batch_run(sim)  # submits the failed ones
        clock.advance(DAY / 2)
        batch_run(sim)  # collects them
        rounds += 1
    assert set(read()["status"]) == {"ok"} and len(sim.stats.batch.created) == rounds + 1
    ran = executed(sim)
    assert set(ran) == set(IDS) and ran.total() > len(IDS)  # the failed lines ran again, the others once
    assert all(ran[i] == 1 for i in IDS if i not in set(failed["id"]))


def test_a_model_the_batch_api_refuses_fails_validation_row_by_row(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(sim, "-m", "qwen-no-such-model").exit_code == 6
    clock.advance(100)
    result = batch_run(sim, "-m", "qwen-no-such-model")
    assert result.exit_code == 3, result.stderr
    out = read()
    assert set(out["status"]) == {"error"} and set(out["error_code"]) == {"model_not_found"}
    assert batch_run(sim, "-m", "qwen-no-such-model").exit_code == 3
    assert len(sim.stats.batch.created) == 1  # a line the service named is not sent again


def test_a_line_over_six_mb_is_that_rows_error_and_is_never_uploaded(batch_sim, tmp_path):
    sim, clock = batch_sim()
    # 6,000,020 bytes of prompt: over "6 MB" read as decimal, though under 6 MiB
    write_prompts(tmp_path / "in.csv", ["short", "x " * 3_000_010, "short too"])
    assert batch_run(sim).exit_code == 6
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 3
    out = read()
    assert out["status"].to_list() == ["ok", "error", "ok"]
    assert out["error_code"][1] == "batchgen.TooLarge" and "6 MB a line" in out["error_message"][1]
    assert sorted(executed(sim)) == ["r000", "r002"]


def test_a_lost_create_answer_is_found_by_name_not_created_twice(batch_sim, tmp_path):
    sim, clock = batch_sim(batch_fault_lost_create=1.0)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    result = batch_run(sim)
    assert result.exit_code == 6, result.stderr
    assert len(sim.stats.batch.created) == 1 == len(sim.stats.batch.lost_creates)
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0
    assert executed(sim) == Counter(IDS)


@pytest.mark.parametrize(
    ("moment", "reached"),
    [
        ("upload", lambda s: s.stats.batch.files_uploaded == 1),  # killed before the file id is journalled
        ("create", lambda s: len(s.stats.batch.created) == 1),  # before the batch id is
        ("file_content", lambda s: s.stats.batch.calls["file_content"] >= 1),  # while collecting
        ("file_delete", lambda s: s.stats.batch.files_deleted >= 1),  # collected, files not all deleted
    ],
)
def test_kill_9_at_any_moment_creates_no_second_batch_and_pays_no_row_twice(
    batch_sim, tmp_path, moment, reached
):
    sim, clock = batch_sim(batch_hang_after=(moment,), hang_seconds=60)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    if moment in ("file_content", "file_delete"):
        assert batch_run(sim).exit_code == 6
        clock.advance(DAY / 2)
    process = spawn_batch_run(sim)
    wait_for(process, lambda: reached(sim))
    time.sleep(0.2)  # the call has taken effect and hangs: the client waits for its answer
    process.send_signal(signal.SIGKILL)
    process.communicate()

    result = batch_run(sim)
    assert result.exit_code in (0, 6), result.stderr
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0
    assert set(read()["status"]) == {"ok"} and read()["id"].to_list() == IDS
    assert len(sim.stats.batch.created) == 1  # the batch made before the kill is the one collected
    assert executed(sim) == Counter(IDS)  # no row paid twice
    assert stored_files(sim) == []  # no orphan file left in the account's storage


def test_ctrl_c_while_waiting_writes_pending_rows_and_never_cancels(batch_sim, tmp_path):
    sim, _ = batch_sim(batch_validation_seconds=10 * DAY)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    process = spawn_batch_run(sim, "--wait")
    wait_for(process, lambda: sim.stats.batch.calls["retrieve"] > 0)  # submitted, and waiting
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    assert "keep running on the service (none is cancelled)" in stderr
    assert set(read()["status"]) == {"pending"}
    assert sim.stats.batch.calls["cancel"] == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--wait"], "--wait is for batch mode"),
        (["--batch", "--batch-window", "12h"], "--batch-window '12h'"),
        (["--batch", "--batch-speed", "10"], "--batch-speed sets the simulator's"),
        (["--batch", "--base-url", "http://localhost:8000/v1"], "not DashScope"),
        (["--batch", "--stream"], "never streamed"),
        (["--batch", "--simulate", "--batch-speed", "nan"], "give a number above 0, at most 1,000,000"),
    ],
)
def test_batch_usage_errors(tmp_path, args, needle):
    write_prompts(tmp_path / "in.csv", PROMPTS[:2])
    result = invoke(["run", "in.csv", "-o", "out.csv", *args])
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert not Path("out.csv").exists()


def test_batch_list_reads_the_journal_without_a_key(batch_sim, tmp_path):
    sim, _ = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim).exit_code == 6
    with contextlib.closing(sqlite3.connect(journal_path(Path("out.csv")))) as db:
        db.execute("BEGIN IMMEDIATE")  # as a run collecting a batch holds it
        listed = invoke(["batch", "list", "out.csv"], key=None)
    assert listed.exit_code == 0 and "submitted" in listed.stdout and "12 rows" in listed.stdout
    missing = invoke(["batch", "list", "nothing.csv"], key=None)
    assert missing.exit_code == 2 and "no journal beside nothing.csv" in missing.stderr


def test_a_real_time_run_never_sends_rows_a_running_batch_holds(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim).exit_code == 6
    online = invoke(["run", "in.csv", "-o", "out.csv", "--id-column", "id"], sim)  # no --batch
    assert online.exit_code == 6 and "12 rows are in 1 batch(es) not yet collected" in online.stderr
    assert "resumed: 0 done, 0 to go; 12 in batches not yet collected" in online.stderr
    assert set(read()["status"]) == {"pending"} and sim.stats.outcomes["ok"] == 0
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0 and executed(sim) == Counter(IDS)


def test_dry_run_counts_rows_in_running_batches_and_shows_both_prices(batch_sim, tmp_path):
    sim, _ = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim).exit_code == 6
    write_prompts(tmp_path / "in.csv", [*PROMPTS, "one more question"])
    result = invoke(["run", "in.csv", "-o", "out.csv", "--id-column", "id", "--batch", "--dry-run"], sim)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "1 of 13 rows would be sent" in text and "12 in batches not yet collected" in text
    assert "at the Batch API's price" in text and "the same rows online (without --batch)" in text


def test_max_cost_commits_each_batchs_worst_case_at_submission(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS)
    # qwen-plus at batch price, --max-tokens 1000 and thinking off: each row's worst case is
    # about (60 × 0.40 + 1000 × 1.20) / 2 / 1e6 ≈ $0.0006, so $0.003 submits a few rows, not 12.
    args = ("--max-tokens", "1000", "--disable-thinking")
    first = batch_run(sim, *args, "--max-cost", "0.003")
    assert first.exit_code == 5, first.stderr
    out = read()
    pending, skipped = out["status"].to_list().count("pending"), out["status"].to_list().count("skipped")
    assert pending >= 1 and skipped >= 1 and pending + skipped == 12
    assert out["status"].to_list() == ["pending"] * pending + ["skipped"] * skipped  # in input order
    assert "stopped by --max-cost" in first.stderr and len(sim.stats.batch.created) == 1
    more = batch_run(sim, *args, "--max-cost", "1")
    assert more.exit_code == 6 and set(read()["status"]) == {"pending"}
    assert len(sim.stats.batch.created) == 2
    clock.advance(DAY / 2)
    assert batch_run(sim, *args).exit_code == 0 and executed(sim) == Counter(IDS)


def test_management_429s_are_retried_with_backoff(batch_sim, tmp_path):
    import asyncio

    from conftest import FakeTime

    from batchgen.batch.mode import BatchRun, BatchSettings
    from batchgen.batch.remote import BatchAPI
    from batchgen.config import RunConfig
    from batchgen.journal import Journal
    from batchgen.prompts import PromptSpec

    sim, clock = batch_sim(batch_fault_429=0.4, seed=11)
    config = RunConfig(api_key=KEY, base_url=sim.compatible_base_url, api="openai", model="qwen-plus")
    frame = pl.DataFrame({"id": IDS, "prompt": PROMPTS})
    fake = FakeTime()

    async def go(journal: Journal) -> None:
        async with BatchAPI(config, sleep=fake.sleep) as api:
            run = BatchRun(
                config, PromptSpec(), journal, api, BatchSettings(), tmp_path / "out.csv", id_column="id",
                endpoint="sim", sleep=fake.sleep,
            )  # fmt: skip
            await run.prepare([(frame, None)])
            clock.advance(DAY / 2)
            assert await run.settle() == []  # collected

    with Journal(tmp_path / "out.csv.journal") as journal:
        journal.lock(tmp_path / "out.csv")
        journal.open()
        asyncio.run(go(journal))
        answers = journal.lookup(IDS)
    assert sorted(answers) == IDS
    assert all(e.status == "ok" for a in answers.values() for e in a.values())
    assert sum(sim.stats.batch.throttled.values()) > 0 and fake.slept  # 429s met, waited out in fake time
    assert executed(sim) == Counter(IDS) and len(sim.stats.batch.created) == 1


def test_files_split_at_the_line_limit_in_input_order(batch_sim, tmp_path, monkeypatch):
    monkeypatch.setattr("batchgen.batch.lines.MAX_LINES", 5)
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim).exit_code == 6
    out = read()
    ids_by_batch = [
        out.filter(pl.col("batch_id") == b)["id"].to_list()
        for b in out["batch_id"].unique(maintain_order=True)
    ]
    assert ids_by_batch == [IDS[0:5], IDS[5:10], IDS[10:12]]
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0 and executed(sim) == Counter(IDS)


def test_a_row_in_neither_file_of_an_ended_batch_is_flagged_and_sent_again():
    ended = RemoteBatch("batch_1", "completed", "f-in", "f-out", None, EPOCH, "24h", 2, 1, 0, {})
    line = unanswered(ChunkRow(2, "r1", "h"), ended, {}, "qwen-plus", "batch")
    assert not line.final and line.result.error_code == MISSING and "batch_1" in line.result.error_message
    assert "a new batch on the next run" in line.result.error_message
    failed = RemoteBatch(
        "batch_2", "failed", "f-in", None, None, EPOCH, "24h", 0, 0, 0, {},
        ({"code": "mismatched_model", "message": "Line 2: another model", "line": 2},),
    )  # fmt: skip
    named = unanswered(ChunkRow(2, "r1", "h"), failed, {2: failed.errors[0]}, "qwen-plus", "batch")
    assert named.final and named.result.error_code == "mismatched_model"
    other = unanswered(ChunkRow(1, "r0", "h"), failed, {2: failed.errors[0]}, "qwen-plus", "online")
    assert not other.final and other.result.error_code == "batch_failed"
    assert "another model" in other.result.error_message and "sent online" in other.result.error_message
    # cancelled while validating: no file lists the line; it was never run
    cancelled = RemoteBatch("batch_3", "cancelled", "f-in", None, None, EPOCH, "24h", 0, 0, 0, {})
    never = unanswered(ChunkRow(1, "r0", "h"), cancelled, {}, "qwen-plus", "none")
    assert not never.final and never.result.error_code == "batch_cancelled"
    assert "not sent again (--batch-fallback none)" in never.result.error_message


def test_wait_polls_every_minute_backing_off_to_five_and_says_the_phase(batch_sim, tmp_path, caplog):
    import asyncio

    from batchgen.batch.mode import BatchRun, BatchSettings
    from batchgen.batch.remote import BatchAPI
    from batchgen.config import RunConfig
    from batchgen.journal import Journal
    from batchgen.prompts import PromptSpec

    # 1,000 s validating, then a line every 100 s: the run's sleeps move the batch clock.
    sim, clock = batch_sim(batch_validation_seconds=1000, batch_lines_per_second=1 / 100)
    config = RunConfig(api_key=KEY, base_url=sim.compatible_base_url, api="openai", model="qwen-plus")
    frame = pl.DataFrame({"id": IDS[:4], "prompt": PROMPTS[:4]})
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    async def go(journal: Journal) -> None:
        async with BatchAPI(config, sleep=sleep) as api:
            settings = BatchSettings(wait=True)
            run = BatchRun(
                config, PromptSpec(), journal, api, settings, tmp_path / "out.csv", id_column="id",
                endpoint="sim", sleep=sleep,
            )  # fmt: skip
            await run.prepare([(frame, None)])

    caplog.set_level("INFO", logger="batchgen")
    with Journal(tmp_path / "out.csv.journal") as journal:
        journal.lock(tmp_path / "out.csv")
        journal.open()
        asyncio.run(go(journal))
        assert all(e.status == "ok" for a in journal.lookup(IDS[:4]).values() for e in a.values())
    waits = [line for line in caplog.messages if line.startswith("waiting on 1 batch(es)")]
    assert waits[0] == "waiting on 1 batch(es): validating; 0/0 lines done"
    assert "waiting on 1 batch(es): in_progress; 3/4 lines done" in waits
    schedule = [60, 90, 135, 202.5, *[300] * (len(waits) - 4)]  # x1.5 from a minute, up to five
    assert len(waits) > 5 and sum(slept) == pytest.approx(sum(schedule))
    assert max(slept) <= 1.0  # slept in steps, so that Ctrl-C is heard within a second
    assert "collected batch" in caplog.text


def test_a_batch_the_service_no_longer_knows_frees_its_rows(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(sim).exit_code == 6
    clock.advance(31 * DAY)  # past the 30 days batches can be queried
    result = batch_run(sim)
    assert "is no longer known to" in result.stderr and "its 3 rows are sent again" in result.stderr
    assert result.exit_code == 6 and len(sim.stats.batch.created) == 2


def test_batch_mode_from_a_job_file(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    job = tmp_path / "job.toml"
    job.write_text(
        'input = "in.csv"\noutput = "out.csv"\nid_column = "id"\nbatch = true\nbatch_window = "2d"\n'
    )
    assert invoke(["run", "--job", str(job)], sim).exit_code == 6
    assert sim.stats.batch.created and read()["status"].to_list() == ["pending"] * 3
    clock.advance(DAY)
    assert invoke(["run", "--job", str(job)], sim).exit_code == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('input = "in.csv"\noutput = "o2.csv"\nbatch = "yes"\n')
    refused = invoke(["run", "--job", str(bad)], sim)
    assert refused.exit_code == 2 and "'batch'" in refused.stderr


def chunk_table(out: str = "out.csv") -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(journal_path(Path(out)))) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM batch_chunks ORDER BY rowid").fetchall()


def test_a_create_answered_500_is_not_sent_again_by_that_run_and_is_looked_up_by_the_next(
    batch_sim, tmp_path
):
    sim, clock = batch_sim(batch_fault_create_500=1.0)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    first = batch_run(sim)
    assert first.exit_code == 6 and "lists no batch of it yet" in first.stderr, first.stderr
    assert sim.stats.batch.failed_creates == 1 and sim.stats.batch.created == []  # one create, no resend
    assert set(read()["status"]) == {"pending"} and [c["state"] for c in chunk_table()] == ["uploaded"]

    object.__setattr__(sim.config, "batch_fault_create_500", 0.0)  # the service is well again
    soon = batch_run(sim)  # minutes later: a batch made moments ago may not be listed yet
    assert soon.exit_code == 6 and "no batch of" in soon.stderr and "is listed yet" in soon.stderr
    assert sim.stats.batch.created == []
    clock.advance(601)
    second = batch_run(sim)  # looks the batch up by file and name, finds none, sends the rows again
    assert second.exit_code == 6 and len(sim.stats.batch.created) == 1
    assert [c["state"] for c in chunk_table()] == ["abandoned", "submitted"]
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0 and executed(sim) == Counter(IDS)
    assert stored_files(sim) == []


def test_two_batches_made_of_one_file_the_later_is_cancelled_before_it_runs(batch_sim, tmp_path):
    sim, clock = batch_sim(batch_fault_create_500=1.0)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    assert batch_run(sim).exit_code == 6
    (chunk,) = chunk_table()
    url = sim.base_url.replace("/api/v1", "/compatible-mode/v1/batches")
    payload = {"input_file_id": chunk["file_id"], "endpoint": "/v1/chat/completions",
               "completion_window": "24h", "metadata": {"ds_name": chunk["name"]}}  # fmt: skip
    object.__setattr__(sim.config, "batch_fault_create_500", 0.0)
    made = [
        httpx.post(url, json=payload, headers={"Authorization": f"Bearer {KEY}"}).json() for _ in range(2)
    ]
    clock.advance(1)
    result = batch_run(sim)
    assert f"batch {made[1]['id']} repeats {made[0]['id']}" in result.stderr, result.stderr
    assert sim.stats.batch.calls["cancel"] == 1 and set(read()["batch_id"]) == {made[0]["id"]}
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0 and executed(sim) == Counter(IDS)  # the repeat ran nothing


def test_a_changed_prompt_waits_for_the_batch_that_holds_its_row(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(sim).exit_code == 6
    write_prompts(tmp_path / "in.csv", [PROMPTS[0], "A changed question.", PROMPTS[2]])
    held = batch_run(sim)
    assert held.exit_code == 6 and set(read()["status"]) == {"pending"}
    assert len(sim.stats.batch.created) == 1  # r001 is in a running batch: not sent in another
    clock.advance(DAY / 2)
    collected = batch_run(sim)  # the old answer is collected; the changed prompt goes now
    assert collected.exit_code == 6 and read()["status"].to_list() == ["ok", "pending", "ok"]
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0 and len(sim.stats.batch.created) == 2
    assert executed(sim) == Counter({"r000": 1, "r001": 2, "r002": 1})  # each request paid once


def test_batches_another_service_holds_stay_pending_there(batch_sim, tmp_path):
    first, clock = batch_sim()
    other, _ = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(first).exit_code == 6
    elsewhere = batch_run(other)
    assert elsewhere.exit_code == 6 and f"was submitted to {first.compatible_base_url}" in elsewhere.stderr
    assert other.stats.batch.created == [] and set(read()["status"]) == {"pending"}
    clock.advance(DAY / 2)
    assert batch_run(first).exit_code == 0 and executed(first) == Counter(IDS[:3])


def test_a_batch_unknown_before_its_30_days_keeps_its_rows_pending(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(sim).exit_code == 6
    with contextlib.closing(sqlite3.connect(journal_path(Path("out.csv")))) as db, db:
        db.execute("UPDATE batch_chunks SET batch_id = 'batch_of_another_key'")  # as another key sees it
    unknown = batch_run(sim)
    assert unknown.exit_code == 6 and "is unknown to" in unknown.stderr and "stay pending" in unknown.stderr
    assert len(sim.stats.batch.created) == 1 and set(read()["status"]) == {"pending"}
    clock.advance(31 * DAY)
    late = batch_run(sim)
    assert "no longer known" in late.stderr and len(sim.stats.batch.created) == 2


def test_simulate_without_wait_says_its_batches_end_with_the_run(tmp_path):
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    alone = invoke(["run", "in.csv", "-o", "out.csv", "--batch", "--simulate"], key=None)
    assert alone.exit_code == 6 and "ends with this run" in alone.stderr, alone.stderr
    dry = invoke(["run", "in.csv", "-o", "out.csv", "--batch", "--simulate", "--dry-run"], key=None)
    assert "dry run: 3 of 3 rows would be sent" in dry.stdout + dry.stderr  # that batch is gone
    again = invoke(["run", "in.csv", "-o", "out.csv", "--batch", "--simulate", "--wait"], key=None)
    assert again.exit_code == 0 and "ran on the simulator of an earlier --simulate run" in again.stderr
    assert set(read()["status"]) == {"ok"}
    write_prompts(tmp_path / "in.csv", PROMPTS[:4])
    assert invoke(["run", "in.csv", "-o", "out.csv", "--batch", "--simulate"], key=None).exit_code == 6
    online = invoke(["run", "in.csv", "-o", "out.csv", "--simulate", "--api", "openai"], key=None)
    assert online.exit_code == 0 and "earlier --simulate run ended with it" in online.stderr, online.stderr
    assert set(read()["status"]) == {"ok"} and Counter(read()["billing_mode"]) == {"batch": 3, "online": 1}


def test_a_real_time_run_after_batch_mode_reuses_its_answers_with_api_openai(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(sim).exit_code == 6
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0
    reused = invoke(["run", "in.csv", "-o", "out.csv", "--id-column", "id", "--api", "openai"], sim)
    assert reused.exit_code == 0 and "add --api openai" not in reused.stderr, reused.stderr
    assert "3 done, 0 to go" in reused.stderr and sim.stats.outcomes["ok"] == 0  # nothing sent online
    assert set(read()["billing_mode"]) == {"batch"}
    native = invoke(["run", "in.csv", "-o", "out.csv", "--id-column", "id"], sim)  # the native API's requests
    assert "add --api openai to reuse them" in native.stderr, native.stderr
    assert sim.stats.outcomes["ok"] == 3


def test_ctrl_c_twice_during_an_upload_stops_at_once_and_the_next_run_settles_it(batch_sim, tmp_path):
    sim, clock = batch_sim(batch_hang_after=("upload",), hang_seconds=60)
    write_prompts(tmp_path / "in.csv", PROMPTS)
    process = spawn_batch_run(sim)
    wait_for(process, lambda: sim.stats.batch.files_uploaded > 0)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130 and "the batch pass stopped where it was" in stderr, stderr
    assert read()["id"].to_list() == IDS and set(read()["status"]) == {"pending"}

    assert batch_run(sim).exit_code == 6  # the upload is found by name and freed; the rows go again
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0 and executed(sim) == Counter(IDS)
    assert len(sim.stats.batch.created) == 1 and stored_files(sim) == []


def test_collect_streams_the_files_keeps_an_answer_over_an_error_and_counts_unreadable_lines(
    tmp_path, caplog
):
    """Shapes the simulator never sends: a custom_id twice (error, then answer; answer, then
    error) and lines that are not JSON. Served by a transport, read by the real collect."""
    import asyncio
    import json

    from batchgen.batch.mode import BatchRun, BatchSettings
    from batchgen.batch.remote import BatchAPI
    from batchgen.batch.store import Chunk
    from batchgen.config import RunConfig
    from batchgen.journal import Journal
    from batchgen.prompts import PromptSpec

    def answer(custom_id: str) -> str:
        body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "qwen-plus",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Blue."},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}  # fmt: skip
        response = {"status_code": 200, "request_id": f"req-{custom_id}", "body": body}
        return json.dumps(
            {"id": f"req-{custom_id}", "custom_id": custom_id, "response": response, "error": None}
        )

    def refused(custom_id: str) -> str:
        error = {"code": "batch_expired", "message": "not run"}
        return json.dumps({"id": "x", "custom_id": custom_id, "response": None, "error": error})

    files = {
        "f-out": "\n".join([refused("r0"), answer("r0"), answer("r1"), "not json", ""]),
        "f-err": "\n".join([refused("r1"), "{broken", refused("r2")]),
    }

    def serve(request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        if request.method == "GET" and parts[-1] == "content":
            return httpx.Response(200, content=files[parts[-2]].encode())
        return httpx.Response(200, json={"id": parts[-1], "deleted": True})

    config = RunConfig(api_key=KEY, base_url="http://batch.test/compatible-mode/v1", api="openai")
    with Journal(tmp_path / "j.sqlite") as journal:
        journal.open()

        async def collect() -> None:
            async with BatchAPI(config, transport=httpx.MockTransport(serve)) as api:
                run = BatchRun(config, PromptSpec(), journal, api, BatchSettings(), tmp_path / "out.csv",
                               id_column=None, endpoint="chat")  # fmt: skip
                chunk = Chunk("c1", "qwen-plus", 4, 100, "24h", base_url=run.base_url, file_id="f-in")
                run.store.add(chunk, [ChunkRow(i + 1, f"r{i}", "h") for i in range(4)])
                remote = RemoteBatch(
                    "batch_1", "expired", "f-in", "f-out", "f-err", EPOCH, "24h", 4, 2, 1, {}
                )
                await run.collect(chunk, remote)

        with caplog.at_level("INFO", logger="batchgen"):
            asyncio.run(collect())
        found = journal.lookup(["r0", "r1", "r2", "r3"])
    status = {key: answers["h"].status for key, answers in found.items()}
    assert status == {"r0": "ok", "r1": "ok", "r2": "error", "r3": "error"}
    assert found["r2"]["h"].result["error_code"] == "batch_expired" and not found["r2"]["h"].final
    # r3 has no readable line: its answer may be in an unreadable one, billed; it is not sent again
    assert found["r3"]["h"].result["error_code"] == "batchgen.BatchLineUnreadable" and found["r3"]["h"].final
    assert "2 lines of batch batch_1's result files could not be read" in caplog.text
    assert "2 of 4 rows answered" in caplog.text


def test_a_full_disk_while_writing_a_batch_file_is_one_line_and_loses_no_row(
    batch_sim, tmp_path, monkeypatch
):
    import errno

    from batchgen.batch.lines import ChunkFile

    def full(self: ChunkFile, line: bytes, row: ChunkRow, worst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    sim, _ = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    monkeypatch.setattr(ChunkFile, "append", full)
    result = batch_run(sim)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "batch mode could not write beside out.csv: No space left on device; free space" in result.stderr
    assert read()["id"].to_list() == IDS[:3] and sim.stats.batch.files_uploaded == 0
    assert not list(tmp_path.glob(".out.csv.batch.tmp"))


def test_fresh_is_refused_while_batches_may_still_answer_rows(batch_sim, tmp_path):
    sim, clock = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(sim).exit_code == 6
    fresh = batch_run(sim, "--fresh")
    assert fresh.exit_code == 2 and "3 rows in 1 batch(es) not yet collected" in fresh.stderr
    assert "run with --batch to collect them first" in fresh.stderr and len(sim.stats.batch.created) == 1
    clock.advance(DAY / 2)
    assert batch_run(sim).exit_code == 0
    assert batch_run(sim, "--fresh").exit_code == 6  # all collected: --fresh starts over, as asked
    assert len(sim.stats.batch.created) == 2


def test_wait_leaves_an_unlisted_create_pending_and_a_run_after_the_grace_resubmits(batch_sim, tmp_path):
    sim, clock = batch_sim(
        batch_fault_create_500=1.0, batch_validation_seconds=0, batch_finalizing_seconds=0,
        batch_lines_per_second=1e9,
    )  # fmt: skip
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(sim).exit_code == 6
    object.__setattr__(sim.config, "batch_fault_create_500", 0.0)
    waited = batch_run(sim, "--wait")  # within the grace: nothing to wait on, nothing resent
    assert waited.exit_code == 6 and set(read()["status"]) == {"pending"}, waited.stderr
    assert waited.stderr.count("is listed yet") == 1 and sim.stats.batch.created == []
    clock.advance(601)
    assert batch_run(sim, "--wait").exit_code == 0 and executed(sim) == Counter(IDS[:3])


def test_a_journal_whose_batch_tables_cannot_be_read_is_refused_not_taken_as_empty(batch_sim, tmp_path):
    sim, _ = batch_sim()
    write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert batch_run(sim).exit_code == 6
    with contextlib.closing(sqlite3.connect(journal_path(Path("out.csv")))) as db:
        db.execute("ALTER TABLE batch_chunks RENAME COLUMN create_sent_at TO sent")  # another layout
    for extra in (["--fresh"], [], ["--fresh", "--dry-run"]):
        result = batch_run(sim, *extra)
        assert result.exit_code == 2 and "Traceback" not in result.stderr, (extra, result.stderr)
        assert "pre-release batchgen" in result.stderr
    listed = invoke(["batch", "list", "out.csv"], key=None)
    assert listed.exit_code == 2 and "pre-release batchgen" in listed.stderr
    assert len(sim.stats.batch.created) == 1  # nothing was sent again
