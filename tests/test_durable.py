"""Durable runs: the journal, resume, kill -9, signals, the lock.

The crash tests run batchgen as a real subprocess against a simulator in this process, so
the simulator outlives the client and counts every request it received, re-sends included.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import KEY, invoke, write_prompts

from batchgen.journal import Journal, journal_path
from batchgen.results import RowResult

ROWS = 120


def start_run(sim, source: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DASHSCOPE_HTTP_BASE_URL": sim.base_url, "DASHSCOPE_API_KEY": KEY}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchgen.cli",
            "run",
            str(source),
            "-o",
            str(out),
            "--id-column",
            "id",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def journalled(out: Path) -> int:
    path = journal_path(out)
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM rows").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def wait_for_rows(out: Path, at_least: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while journalled(out) < at_least:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def served_per_prompt(sim) -> int:
    return len(sim.stats.served)


def journalled_request_ids(out: Path) -> set[str]:
    with sqlite3.connect(f"file:{journal_path(out)}?mode=ro", uri=True) as db:
        return {json.loads(result)["request_id"] for (result,) in db.execute("SELECT result FROM rows")}


# The journal commits finished rows in groups, each within 50 ms of finishing (the README's
# promise, journal.COMMIT_WINDOW). A kill -9 may lose those 50 ms of rows and what was in
# flight, nothing older: every answer the simulator finished serving longer than this before
# the kill must be in the journal. The slack past the window is the loopback and the client's
# parsing on a loaded test machine; a window of 0.4 s fails this, and so does grouping until
# the end of the run. The kill comes a while after the journal last grew, not just after a commit.
WINDOW = 0.05
KILL_SLACK = 0.2


@pytest.mark.parametrize("attempt", range(3))
def test_kill_9_then_resume_sends_only_what_was_in_flight(simulator, tmp_path, attempt):
    sim = simulator(latency=0.05, jitter=0.04)
    source = write_prompts(tmp_path / "in.csv", [f"Prompt {i}: explain item {i}." for i in range(ROWS)])
    out = tmp_path / "out.parquet"
    concurrency = 8

    process = start_run(sim, source, out, "-c", str(concurrency), "--rpm", "60000")
    wait_for_rows(out, 15 + 20 * attempt, process)  # kill at a different point each time
    time.sleep(0.3)
    killed_at = time.monotonic()
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)
    assert not out.exists()  # killed before writing: nothing half-written
    done_before = journalled(out)
    served = list(zip(sim.stats.served, sim.stats.answered, strict=True))  # (request id, (when, tokens))
    old = {request_id for request_id, (when, _) in served if when < killed_at - WINDOW - KILL_SLACK}
    assert old <= journalled_request_ids(out)
    recent = len(served) - len(old)  # served within the window (and slack) before the kill
    in_flight = sim.stats.requests - len(served)

    result = invoke(
        ["run", str(source), "-o", str(out), "--id-column", "id", "-c", str(concurrency), "--rpm", "60000"],
        sim,
    )

    assert result.exit_code == 0, result.stderr
    frame = pl.read_parquet(out)
    assert frame["id"].to_list() == [f"r{i:03d}" for i in range(ROWS)]  # each row once, in order
    assert set(frame["status"]) == {"ok"}
    assert frame["request_id"].n_unique() == ROWS
    resent = sim.stats.requests - ROWS - in_flight  # beyond one per row and the abandoned ones
    assert in_flight <= concurrency
    assert 0 <= resent <= recent  # only rows finished in the last window were paid twice
    assert f"resumed: {done_before:,} done, {ROWS - done_before:,} to go" in result.stderr
    print(f"kill -9 after {done_before} rows: {in_flight} in flight, {resent} finished and sent again")


def test_grouped_commits_land_within_the_window(tmp_path):
    """In a run's group, a row is committed by the window's timer, not only at the end."""
    out = tmp_path / "out.csv"
    seen: list[int] = []

    async def main() -> None:
        with Journal(journal_path(out)) as journal:
            journal.open()
            with journal.grouped(0.05):
                journal.record("0", "h", True, RowResult(status="ok", reply="a"))
                seen.append(journalled(out))  # not yet: the group is open
                await asyncio.sleep(0.2)
                seen.append(journalled(out))  # the timer committed it
                journal.record("1", "h", True, RowResult(status="ok", reply="b"))
            seen.append(journalled(out))  # the end of the block commits the rest

    asyncio.run(main())
    assert seen == [0, 1, 2]


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_stops_gracefully_and_the_run_resumes(simulator, tmp_path, sig, code):
    sim = simulator(latency=0.3)
    source = write_prompts(tmp_path / "in.csv", [f"p{i}" for i in range(60)])
    out = tmp_path / "out.csv"

    process = start_run(sim, source, out, "-c", "4", "--rpm", "60000")
    wait_for_rows(out, 8, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=20)

    assert process.returncode == code
    assert "Traceback" not in stderr
    assert f"stopped by {sig.name}" in stderr and "run the same command again" in stderr
    frame = pl.read_csv(out)
    assert frame.height == 60
    done = int((frame["status"] == "ok").sum())
    assert done >= 8 and (frame["status"] == "skipped").sum() == 60 - done
    assert journalled(out) == done  # in-flight requests finished and were recorded
    assert sim.stats.requests == done  # none was abandoned mid-way

    again = invoke(
        ["run", str(source), "-o", str(out), "--id-column", "id", "-c", "8", "--rpm", "60000"], sim
    )
    assert again.exit_code == 0
    assert sim.stats.requests == 60
    assert set(pl.read_csv(out)["status"]) == {"ok"}


def test_a_second_ctrl_c_stops_at_once_with_the_journal_intact(simulator, tmp_path):
    sim = simulator(latency=2.0)
    source = write_prompts(tmp_path / "in.csv", [f"p{i}" for i in range(20)])
    out = tmp_path / "out.csv"

    process = start_run(sim, source, out, "-c", "4", "--rpm", "60000", "--grace", "60")
    deadline = time.monotonic() + 10
    while sim.stats.requests < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)

    assert process.returncode == 130
    assert "stopping now" in stderr and "Traceback" not in stderr
    # Skipped, not ok: the 2 s answers in flight were abandoned, not waited out.
    assert set(pl.read_csv(out)["status"]) == {"skipped"}
    with sqlite3.connect(journal_path(out)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_second_run_on_the_same_output_exits_4_touching_nothing(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    out = tmp_path / "out.csv"
    out.write_text("earlier\n")

    with Journal(journal_path(out)) as holder:
        holder.lock(out)
        result = invoke(["run", str(source), "-o", str(out)], sim)

    assert result.exit_code == 4
    assert result.stderr == (
        f"batchgen: error: another batchgen run (pid {os.getpid()}) is "
        f"writing {out}: wait for it to finish, or give this run another -o\n"
    )
    assert out.read_text() == "earlier\n"
    assert sim.stats.requests == 0
    assert not journal_path(out).exists()


def test_validate_exits_4_while_another_run_holds_the_output(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a"])
    out = tmp_path / "out.csv"
    assert invoke(["validate", str(source), "-o", str(out)], sim).exit_code == 0
    with Journal(journal_path(out)) as holder:
        holder.lock(out)
        result = invoke(["validate", str(source), "-o", str(out)], sim)
    assert result.exit_code == 4 and "another batchgen run" in result.stderr
    assert invoke(["validate", str(source), "-o", str(out)], sim).exit_code == 0  # released


def test_changed_rows_are_sent_again_and_counted(simulator, tmp_path):
    sim = simulator()
    prompts = [f"question {i}" for i in range(10)]
    source = write_prompts(tmp_path / "in.csv", prompts)
    out = tmp_path / "out.csv"
    args = ["run", str(source), "-o", str(out), "--id-column", "id", "--rpm", "60000"]
    assert invoke(args, sim).exit_code == 0

    again = invoke(args, sim)  # nothing changed: nothing is sent
    assert again.exit_code == 0 and sim.stats.requests == 10
    assert "resumed: 10 done, 0 to go" in again.stderr

    prompts[2], prompts[7] = "a new question", "another one"
    write_prompts(source, prompts)
    changed = invoke(args, sim)
    assert changed.exit_code == 0
    assert sim.stats.requests == 12
    # One line, before anything is paid, already counts what will be sent.
    assert "resumed: 8 done, 2 to go (2 changed since the last run)" in changed.stderr
    assert changed.stderr.index("resumed:") < changed.stderr.index("10 rows: 10 ok")
    frame = pl.read_csv(out)
    assert frame["reply"][2].startswith('Qwen (simulated) on "a new question"')

    model = invoke([*args, "--temperature", "0.3"], sim)  # a parameter is part of the request
    assert model.exit_code == 0 and sim.stats.requests == 22
    assert "resumed: 0 done, 10 to go (10 changed since the last run)" in model.stderr

    # Every paid answer stays in the journal: switching back costs nothing.
    back = invoke(args, sim)
    assert back.exit_code == 0 and sim.stats.requests == 22
    assert "resumed: 10 done, 0 to go" in back.stderr
    assert pl.read_csv(out)["reply"].to_list() == frame["reply"].to_list()


def test_the_resume_line_counts_errors_sent_again_and_rows_never_sent(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["fine", "[sim:InternalError] y", ""])
    out = tmp_path / "out.csv"
    args = ["run", str(source), "-o", str(out), "--max-attempts", "1", "--rpm", "60000"]
    assert invoke(args, sim).exit_code == 3
    write_prompts(source, ["fine", "[sim:InternalError] y", "", "a new row"])
    again = invoke(args, sim)
    assert "resumed: 1 done, 2 to go (1 errors sent again, 1 never sent); 1 not sendable" in again.stderr


def test_another_request_set_never_silently_replaces_an_output(simulator, tmp_path):
    # The README's --limit 5 -m qwen-turbo on the job's output: the 50-row table is kept aside,
    # and the journal keeps its answers, so the first command afterwards sends nothing.
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", [f"question {i}" for i in range(12)])
    out = tmp_path / "out.csv"
    args = ["run", str(source), "-o", str(out), "--rpm", "60000"]
    assert invoke(args, sim).exit_code == 0
    first = out.read_text()

    other = invoke([*args, "--limit", "5", "-m", "qwen-turbo"], sim)
    assert other.exit_code == 0, other.stderr
    kept = list(tmp_path.glob("out.replaced-*.csv"))
    assert len(kept) == 1 and kept[0].read_text() == first
    assert "held the answers of another request set (model qwen-plus, rows 12)" in other.stderr
    assert pl.read_csv(out).height == 5

    kept_table = pl.read_csv(kept[0])
    back = invoke(args, sim)
    assert back.exit_code == 0 and sim.stats.requests == 12 + 5
    assert "resumed: 12 done, 0 to go" in back.stderr
    assert pl.read_csv(out).drop("finished_at").equals(kept_table.drop("finished_at"))
    # The copy of this request set is gone (the output holds it again: no double count in
    # `batchgen cost 'out*.csv'`); the qwen-turbo table, answers the output lacks, stays.
    replaced = list(tmp_path.glob("out.replaced-*.csv"))
    assert [pl.read_csv(t)["model"].unique().to_list() for t in replaced] == [["qwen-turbo"]]

    same = invoke(args, sim)  # the same request set again replaces its own output, as always
    assert same.exit_code == 0 and list(tmp_path.glob("out.replaced-*.csv")) == replaced


def test_a_schema_1_journal_is_migrated_and_keeps_its_answers(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    out = tmp_path / "out.csv"
    args = ["run", str(source), "-o", str(out), "--rpm", "60000"]
    assert invoke(args, sim).exit_code == 0
    with sqlite3.connect(journal_path(out)) as db:  # rebuild it as schema 1 wrote it
        db.executescript(
            "ALTER TABLE rows RENAME TO r2; CREATE TABLE rows (key TEXT PRIMARY KEY, request_hash TEXT "
            "NOT NULL, status TEXT NOT NULL, final INTEGER NOT NULL, result TEXT NOT NULL); INSERT INTO "
            "rows SELECT * FROM r2; DROP TABLE r2; UPDATE meta SET value = '1' WHERE key = 'schema';"
        )
    again = invoke(args, sim)
    assert again.exit_code == 0 and sim.stats.requests == 2
    assert "resumed: 2 done, 0 to go" in again.stderr
    with sqlite3.connect(journal_path(out)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)


def test_retryable_errors_are_retried_on_resume_permanent_ones_kept(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(
        tmp_path / "in.csv", ["fine", "[sim:DataInspectionFailed] x", "[sim:InternalError] y"]
    )
    out = tmp_path / "out.csv"
    args = ["run", str(source), "-o", str(out), "--max-attempts", "1", "--rpm", "60000"]
    assert invoke(args, sim).exit_code == 3
    assert sim.stats.requests == 3

    assert invoke(args, sim).exit_code == 3
    assert sim.stats.requests == 4  # only the gave-up row went again

    assert invoke([*args, "--retry-errors"], sim).exit_code == 3
    assert sim.stats.requests == 6  # and now the moderated one too

    assert invoke([*args, "--fresh"], sim).exit_code == 3
    assert sim.stats.requests == 9


def test_rows_of_a_fatal_run_are_sent_again_once_fixed(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b", "c"])
    out = tmp_path / "out.csv"
    args = ["run", str(source), "-o", str(out), "-c", "1", "--rpm", "60000"]
    assert invoke(args, sim, key="sk-wrong").exit_code == 1
    fixed = invoke(args, sim)
    assert fixed.exit_code == 0
    assert set(pl.read_csv(out)["status"]) == {"ok"}


def test_output_is_rebuilt_from_the_journal(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    out = tmp_path / "out.jsonl"
    args = ["run", str(source), "-o", str(out)]
    assert invoke(args, sim).exit_code == 0
    first = pl.read_ndjson(out)
    out.unlink()  # e.g. the process died while writing it

    assert invoke(args, sim).exit_code == 0
    assert sim.stats.requests == 2
    rebuilt = pl.read_ndjson(out)
    assert rebuilt.equals(first)


def test_summary_json_and_json_logs(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "[sim:DataInspectionFailed] b", "c"])
    out = tmp_path / "out.csv"
    summary = tmp_path / "reports" / "summary.json"

    result = invoke(
        [
            "run",
            str(source),
            "-o",
            str(out),
            "--summary",
            str(summary),
            "--log-format",
            "json",
            "--rpm",
            "60000",
        ],
        sim,
    )

    assert result.exit_code == 3
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines[-1]["event"] == "summary" and lines[-1]["rows"]["ok"] == 2
    data = json.loads(summary.read_text())
    assert data["exit_code"] == 3 and data["rows"] == {
        "total": 3,
        "ok": 2,
        "error": 1,
        "skipped": 0,
        "pending": 0,
        "resumed": 0,
        "changed": 0,
    }
    assert data["error_codes"] == {"DataInspectionFailed": 1}
    assert data["tokens"]["input"] > 0 and data["attempts"] == 3
    assert data["output"] == str(out) and data["job"] is None
    assert data["started_at"] <= data["ended_at"]


def test_summary_is_written_for_a_run_that_could_not_start(tmp_path):
    summary = tmp_path / "summary.json"
    result = invoke(
        ["run", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o.csv"), "--summary", str(summary)]
    )
    assert result.exit_code == 2
    data = json.loads(summary.read_text())
    assert data["exit_code"] == 2 and "input file not found" in data["error"]


def test_a_locked_run_leaves_the_running_jobs_summary_alone(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a"])
    out, summary = tmp_path / "out.csv", tmp_path / "s.json"
    summary.write_text('{"exit_code": 0}')
    with Journal(journal_path(out)) as holder:
        holder.lock(out)
        result = invoke(["run", str(source), "-o", str(out), "--summary", str(summary)], sim)
    assert result.exit_code == 4 and summary.read_text() == '{"exit_code": 0}'


def test_answers_from_another_endpoint_are_not_reused(simulator, tmp_path):
    first, second = simulator(), simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    args = ["run", str(source), "-o", "o.csv"]
    assert invoke(args, first).exit_code == 0
    assert invoke(args, second).exit_code == 0
    assert second.stats.requests == 2  # e.g. --simulate answers never stand in for real ones


def test_a_corrupt_journal_is_one_line_naming_fresh(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a"])
    journal_path(tmp_path / "o.csv").write_bytes(b"this is not sqlite" * 100)
    result = invoke(["run", str(source), "-o", "o.csv"], sim)
    assert result.exit_code == 2 and "is not a batchgen journal" in result.stderr
    assert "--fresh" in result.stderr and "Traceback" not in result.stderr
    assert invoke(["run", str(source), "-o", "o.csv", "--fresh"], sim).exit_code == 0


def test_leftovers_of_a_killed_run_are_cleaned_up(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a"])
    (tmp_path / ".o.parquet.abc.tmp").write_text("x")
    (tmp_path / ".o.parquet.def.parts").mkdir()
    assert invoke(["run", str(source), "-o", "o.parquet"], sim).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_limited_trial_then_the_full_run_keeps_no_copy(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", [f"question {i}" for i in range(12)])
    out = tmp_path / "out.csv"
    args = ["run", str(source), "-o", str(out), "--rpm", "60000"]
    assert invoke([*args, "--limit", "4"], sim).exit_code == 0
    full = invoke(args, sim)  # the trial's rows are a prefix of these: nothing to keep aside
    assert full.exit_code == 0 and "resumed: 4 done, 8 to go\n" in full.stderr
    assert not list(tmp_path.glob("out.replaced-*")) and pl.read_csv(out).height == 12


def test_tables_that_may_hold_the_only_copy_of_an_answer_stay(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    out = tmp_path / "out.csv"
    args = ["run", str(source), "-o", str(out), "--rpm", "60000"]
    old = tmp_path / "out.partial-20250101T000000Z.csv"  # from before outputs recorded their set
    old.write_text("prompt,reply,model\na,an answer paid for once,qwen-plus\n")
    (tmp_path / f"{old.name}.meta.json").write_text('{"model": "qwen-plus"}')
    assert invoke(args, sim).exit_code == 0
    assert old.exists()

    # --fresh forgets the journal: a stopped run's partial table of the same set may then hold
    # the last copy of its answers.
    partial = tmp_path / "out.partial-20250102T000000Z.csv"
    partial.write_text(out.read_text())
    (tmp_path / f"{partial.name}.meta.json").write_text((tmp_path / "out.csv.meta.json").read_text())
    assert invoke([*args, "--fresh"], sim).exit_code == 0
    assert partial.exists()
    assert invoke(args, sim).exit_code == 0  # the journal has them again: now it goes
    assert not partial.exists() and old.exists()


def test_signals_during_the_output_swap_wait_for_it():
    import threading

    from batchgen.commands.outputs import signals_deferred as _signals_deferred

    finished = []
    with pytest.raises(KeyboardInterrupt), _signals_deferred():
        # From another thread, as the kernel may pick any of polars' or aiohttp's threads.
        threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT)).start()
        time.sleep(0.1)
        finished.append(True)
    assert finished == [True]
