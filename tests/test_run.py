"""``batchgen run`` end to end, over real loopback sockets against the simulator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import polars as pl
import pytest
from conftest import KEY, FakeTime, invoke, write_prompts

import batchgen
from batchgen.results import OUTPUT_COLUMNS, OUTPUT_SCHEMA, exit_code
from batchgen.runner import arun
from batchgen.simulator import simulated_reply
from batchgen.transport import make_transport

PROMPTS = [f"Question {i}: what is {i} squared, and why?" for i in range(60)]
FAST = ["--rpm", "60000", "-c", "16"]


def read(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)


def test_every_row_ok_in_order_despite_20_percent_faults(simulator):
    sim = simulator(
        latency=0.01,
        fault_429=0.05,
        fault_500=0.05,
        fault_drop=0.04,
        fault_truncate=0.03,
        fault_200_error=0.03,
        seed=7,
    )
    fake = FakeTime()  # the retries' backoff and the pacing in fake time: no real waiting
    config = batchgen.RunConfig(api_key=KEY, base_url=sim.base_url, rpm=60000, concurrency=16)
    ids = [f"r{i:03d}" for i in range(60)]
    table = pl.DataFrame({"id": ids, "prompt": PROMPTS})
    result = asyncio.run(arun(table, config, batch_rows=16, sleep=fake.sleep, clock=fake.clock))

    assert exit_code(result) == 0
    frame = result.frame
    assert frame["id"].to_list() == ids  # input order kept, across batches
    assert frame["status"].unique().to_list() == ["ok"]
    # Faults really happened and were retried, not avoided.
    faults = sum(n for outcome, n in sim.stats.outcomes.items() if outcome.startswith("fault_"))
    assert faults >= 5
    assert frame["attempts"].sum() == 60 + faults
    assert frame["attempts"].max() > 1
    assert len([s for s in fake.slept if s >= 0.375]) == faults  # each retry backed off first
    # Each reply is exactly what the simulator served under that request ID.
    served = sim.stats.served
    for row in frame.iter_rows(named=True):
        assert served[row["request_id"]] == row["reply"]
        expected = simulated_reply("qwen-plus", [{"role": "user", "content": row["prompt"]}])
        assert row["reply"] == expected.content
        assert row["input_tokens"] == expected.input_tokens
        assert row["total_tokens"] == row["input_tokens"] + row["output_tokens"]


def test_output_has_input_columns_then_documented_columns_with_nulls(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.parquet", ["Hello there", "   "], extra=["a", "b"])
    out = tmp_path / "out.parquet"

    result = invoke(["run", str(source), "-o", str(out), *FAST], sim)

    assert result.exit_code == 3  # the blank prompt is a row error
    frame = pl.read_parquet(out)
    assert frame.columns == ["id", "prompt", "extra", *OUTPUT_COLUMNS]
    assert dict(frame.select(OUTPUT_COLUMNS).schema) == OUTPUT_SCHEMA
    ok, blank = frame.row(0, named=True), frame.row(1, named=True)
    assert ok["status"] == "ok" and ok["finish_reason"] == "stop" and ok["model"] == "qwen-plus"
    assert ok["reasoning"] is None and ok["error_code"] is None and ok["http_status"] == 200
    assert ok["latency_ms"] > 0 and ok["finished_at"].tzinfo is not None
    assert blank["status"] == "error" and blank["error_code"] == "batchgen.EmptyPrompt"
    assert blank["reply"] is None and blank["input_tokens"] is None and blank["attempts"] == 0
    assert sim.stats.requests == 1  # the empty prompt was never sent


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_each_output_format_round_trips(simulator, tmp_path, suffix):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["Say hi", "Say bye"])
    out = tmp_path / f"out{suffix}"

    assert invoke(["run", str(source), "-o", str(out), *FAST], sim).exit_code == 0
    frame = {".csv": pl.read_csv, ".jsonl": pl.read_ndjson, ".parquet": pl.read_parquet}[suffix](out)
    assert frame.height == 2 and frame["status"].to_list() == ["ok", "ok"]
    assert frame["reasoning"].null_count() == 2  # nulls, not empty strings


def test_row_errors_are_recorded_and_the_run_goes_on(simulator, tmp_path):
    sim = simulator()
    prompts = [
        "fine",
        "[sim:DataInspectionFailed] bad",
        "",
        "[sim:InternalError] flaky",
        "[sim:InvalidParameter] odd",
        "also fine",
    ]
    source = write_prompts(tmp_path / "in.csv", prompts)
    out = tmp_path / "out.csv"

    result = invoke(["run", str(source), "-o", str(out), *FAST, "--max-attempts", "2"], sim)

    assert result.exit_code == 3
    frame = pl.read_csv(out)
    assert frame["status"].to_list() == ["ok", "error", "error", "error", "error", "ok"]
    assert frame["error_code"].to_list() == [
        None,
        "DataInspectionFailed",
        "batchgen.EmptyPrompt",
        "InternalError",
        "InvalidParameter",
        None,
    ]
    assert frame["attempts"].to_list() == [1, 1, 0, 2, 1, 1]
    assert frame["error_message"][3].startswith("gave up after 2 attempts")
    assert frame["http_status"].to_list() == [200, 400, None, 500, 400, 200]
    assert frame["request_id"][1] is not None  # the server's ID is kept on errors too
    assert "4 error" in result.stderr


def test_a_rejected_key_stops_the_run_fast_and_still_writes_every_row(simulator, tmp_path):
    sim = simulator(latency=0.05)
    source = write_prompts(tmp_path / "in.csv", PROMPTS)
    out = tmp_path / "out.csv"

    result = invoke(["run", str(source), "-o", str(out), "-c", "4", "--rpm", "6000"], sim, key="sk-wrong")

    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "InvalidApiKey" in errors[0] and "DASHSCOPE_API_KEY" in errors[0]
    assert "sk-wrong" not in result.stderr and "sk-wrong" not in out.read_text()
    frame = pl.read_csv(out)
    assert frame.height == 60
    assert set(frame["status"]) == {"error", "skipped"}
    assert (frame["status"] == "skipped").sum() >= 50
    assert sim.stats.requests <= 4


def test_a_fatal_answer_mid_run_skips_the_rest(simulator, tmp_path):
    sim = simulator()
    prompts = [f"row {i}" for i in range(10)]
    prompts[3] = "[sim:Arrearage] row 3"
    source = write_prompts(tmp_path / "in.csv", prompts)
    out = tmp_path / "out.csv"

    result = invoke(["run", str(source), "-o", str(out), "-c", "1", "--rpm", "60000"], sim)

    assert result.exit_code == 1
    assert "Arrearage" in result.stderr and "top up" in result.stderr
    frame = pl.read_csv(out)
    assert frame["status"].to_list() == ["ok"] * 3 + ["error"] + ["skipped"] * 6
    assert sim.stats.requests == 4


def test_a_failed_run_never_clobbers_an_existing_output(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    out = tmp_path / "out.csv"
    out.write_text("yesterday's answers\n")

    result = invoke(["run", str(source), "-o", str(out), *FAST], sim, key="sk-wrong")

    assert result.exit_code == 1
    assert out.read_text() == "yesterday's answers\n"
    kept = sorted(tmp_path.glob("out.partial-*.csv"))
    assert len(kept) == 1 and str(kept[0].name) in result.stderr
    assert pl.read_csv(kept[0]).height == 2
    assert (tmp_path / f"{kept[0].name}.meta.json").exists()

    # Once a run writes the whole output, the partial tables (whose answers the journal holds,
    # so the output too) and their sidecars go: they do not pile up under cron.
    (tmp_path / "out.partial-20000101T000000Z.csv.meta.json").write_text("{}")  # a sidecar alone
    from batchgen.journal import Journal

    (tmp_path / "new.csv.meta.json").write_text('{"model": "from a write that failed"}')
    Journal(tmp_path / "new.csv.journal").clean_leftovers(tmp_path / "new.csv")
    assert not (tmp_path / "new.csv.meta.json").exists()  # a sidecar without its table goes
    fixed = invoke(["run", str(source), "-o", str(out), *FAST], sim)
    assert fixed.exit_code == 0, fixed.stderr
    assert pl.read_csv(out).height == 2
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


@pytest.mark.parametrize(
    "args", [["--simulate", "--base-url", "http://127.0.0.1:9/api/v1"]], ids=["simulate-and-base-url"]
)
def test_a_run_refused_with_exit_2_leaves_no_journal_or_lock(tmp_path, args):
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(["run", str(source), "-o", str(tmp_path / "out" / "o.csv"), *args])
    assert result.exit_code == 2
    assert not [p for p in tmp_path.rglob("*") if ".journal" in p.name]


class _Stamped(httpx.AsyncBaseTransport):
    """The run's transport, noting the (fake) time each request leaves."""

    def __init__(self, inner: httpx.AsyncBaseTransport, clock: FakeTime) -> None:
        self.inner, self.clock, self.sent = inner, clock, []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(self.clock.now)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_requests_are_paced_per_second(simulator):
    sim = simulator()
    fake = FakeTime()  # pacing in fake time, so the schedule is exact whatever the machine's load
    config = batchgen.RunConfig(api_key=KEY, base_url=sim.base_url, rpm=600, concurrency=50)
    transport = _Stamped(make_transport(config), fake)
    frame = pl.DataFrame({"prompt": [f"p{i}" for i in range(45)]})
    result = asyncio.run(arun(frame, config, sleep=fake.sleep, clock=fake.clock, transport=transport))

    assert set(result.frame["status"]) == {"ok"}
    arrivals = sorted(transport.sent)
    assert len(arrivals) == 45 == sim.stats.requests
    # No 1-second window, the first one included, carries more than rpm/60 + 1 = 11 requests.
    busiest = max(sum(1 for t in arrivals[i:] if t < start + 1.0) for i, start in enumerate(arrivals))
    assert busiest <= 11
    # It ramps up gradually (a third of the rate at first, the whole rate after 3 s)...
    assert sum(1 for t in arrivals if t < arrivals[0] + 1.0) <= 6
    # ...and is not wastefully slow: 45 requests at 10/s take 4.4 s, plus 1 s for the ramp.
    assert arrivals[-1] - arrivals[0] < 6.0


def test_a_hanging_request_times_out_and_is_retried(simulator, tmp_path):
    sim = simulator(fault_hang=0.3, hang_seconds=60, seed=3)
    source = write_prompts(tmp_path / "in.csv", [f"p{i}" for i in range(12)])
    out = tmp_path / "out.csv"

    result = invoke(["run", str(source), "-o", str(out), *FAST, "--timeout", "0.5"], sim)

    assert result.exit_code == 0
    frame = pl.read_csv(out)
    assert sim.stats.outcomes["fault_hang"] >= 1
    assert frame["attempts"].sum() == 12 + sim.stats.outcomes["fault_hang"]


def test_template_system_and_generation_parameters(simulator, tmp_path):
    sim = simulator()
    source = tmp_path / "in.csv"
    pl.DataFrame({"text": ["The cat sat.", "Rain fell all day."], "tone": ["dry", None]}).write_csv(source)
    out = tmp_path / "out.parquet"

    result = invoke(
        [
            "run",
            str(source),
            "-o",
            str(out),
            *FAST,
            "--template",
            "Summarize in a {tone} tone: {text}",
            "--system",
            "Be brief.",
            "--max-tokens",
            "6",
            "--enable-thinking",
        ],
        sim,
    )

    assert result.exit_code == 3  # the null {tone} makes row 2 an error, never sent
    row = pl.read_parquet(out).row(0, named=True)
    expected = simulated_reply(
        "qwen-plus",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Summarize in a dry tone: The cat sat."},
        ],
        max_tokens=6,
        enable_thinking=True,
    )
    assert row["reply"] == expected.content
    assert row["finish_reason"] == "length"
    assert row["reasoning"] == expected.reasoning and row["reasoning_tokens"] > 0
    assert sim.stats.requests == 1


def test_messages_column_and_system_column(simulator, tmp_path):
    sim = simulator()
    source = tmp_path / "in.jsonl"
    conversation = (
        '[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"},'
        '{"role":"user","content":"And in French?"}]'
    )
    pl.DataFrame({"conv": [conversation, "not json"], "sys": ["Translate.", None]}).write_ndjson(source)
    out = tmp_path / "out.csv"

    result = invoke(
        ["run", str(source), "-o", str(out), *FAST, "--messages-column", "conv", "--system-column", "sys"],
        sim,
    )

    assert result.exit_code == 3
    frame = pl.read_csv(out)
    messages = [{"role": "system", "content": "Translate."}, *__import__("json").loads(conversation)]
    assert frame["reply"][0] == simulated_reply("qwen-plus", messages).content
    assert frame["error_code"][1] == "batchgen.InvalidMessages"


def test_multimodal_models_use_their_route_and_a_wrong_route_is_fatal(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["Describe a sunset."])

    ok = invoke(["run", str(source), "-o", str(tmp_path / "a.csv"), "-m", "qwen3.6-plus"], sim)
    assert ok.exit_code == 0
    assert (
        pl.read_csv(tmp_path / "a.csv")["reply"][0]
        == simulated_reply(
            "qwen3.6-plus", [{"role": "user", "content": [{"text": "Describe a sunset."}]}]
        ).content
    )

    wrong = invoke(
        ["run", str(source), "-o", str(tmp_path / "b.csv"), "-m", "qwen3.6-plus", "--endpoint", "text"], sim
    )
    assert wrong.exit_code == 1
    assert "url error" in wrong.stderr and "--endpoint multimodal" in wrong.stderr


def test_unknown_model_is_fatal(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b", "c"])
    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv"), "-m", "qwen-nope", "-c", "1"], sim)
    assert result.exit_code == 1
    assert "no such model" in result.stderr
    assert sim.stats.requests == 1


def test_workspace_header_and_limit(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", [f"p{i}" for i in range(10)])
    out = tmp_path / "out.csv"
    result = invoke(
        ["run", str(source), "-o", str(out), *FAST, "--limit", "3", "--workspace", "ws-123", "-q"], sim
    )
    assert result.exit_code == 0
    assert result.stderr == ""  # --quiet
    assert pl.read_csv(out).height == 3
    assert sim.stats.workspaces == {"ws-123": 3}


def test_simulate_flag_runs_the_sample_data_with_no_key(tmp_path):
    sample = Path(__file__).parent.parent / "sample_data" / "prompts.csv"
    out = tmp_path / "answers.csv"

    result = invoke(["run", str(sample), "-o", str(out), "--simulate", "--rpm", "6000"], key=None)

    assert result.exit_code == 0, result.stderr
    frame = pl.read_csv(out)
    assert frame.height == 50 and set(frame["status"]) == {"ok"}
    assert "50 ok" in result.stderr.splitlines()[-1]


def test_library_returns_the_output_frame(simulator):
    sim = simulator()
    config = batchgen.RunConfig(api_key=KEY, base_url=sim.base_url, rpm=60000)
    frame = pl.DataFrame({"prompt": ["one", "two"], "n": [1, 2]})

    out = batchgen.run_frame(frame, config)

    assert out.columns == ["prompt", "n", *OUTPUT_COLUMNS]
    assert out["status"].to_list() == ["ok", "ok"]
    with pytest.raises(batchgen.FatalAPIError) as caught:
        batchgen.run_frame(frame, batchgen.RunConfig(api_key="sk-bad", base_url=sim.base_url))
    assert caught.value.result.frame.height == 2
    bad = batchgen.RunConfig(api_key="sk-bad-key-123", base_url=sim.base_url)
    assert "sk-bad-key-123" not in repr(bad) and KEY not in repr(config)
    assert "sk-bad" not in str(caught.value)


def test_concurrency_is_capped_at_the_rows_and_a_documented_maximum(simulator, tmp_path):
    import asyncio

    from batchgen import RunConfig
    from batchgen import run as run_library

    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", [f"p{i}" for i in range(20)])
    result = invoke(
        ["run", str(source), "-o", str(tmp_path / "o.csv"), "-c", "1000000", "--rpm", "60000"], sim
    )
    assert result.exit_code == 0, result.stderr
    assert "--concurrency 1,000,000 is more than is useful: batchgen keeps at most 2,000" in result.stderr

    seen: list[int] = []

    async def count_tasks(stats) -> None:  # runs inside the run's event loop
        while True:
            seen.append(len(asyncio.all_tasks()))
            await asyncio.sleep(0.001)

    config = RunConfig(api_key=KEY, base_url=sim.base_url, concurrency=1_000_000, rpm=60000)
    answered = run_library(
        pl.DataFrame({"prompt": [f"q{i}" for i in range(20)]}), config, progress=count_tasks
    )
    assert answered.stats.ok == 20
    assert 0 < max(seen) <= 20 + 4  # a worker a row at most, plus the producer, progress and main


def test_a_run_with_row_errors_says_which_codes(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["fine", "[sim:DataInspectionFailed] x", ""])
    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv"), *FAST], sim)
    assert result.exit_code == 3
    assert "errors by code: " in result.stderr
    line = next(x for x in result.stderr.splitlines() if "errors by code" in x)
    assert "DataInspectionFailed 1" in line and "batchgen.EmptyPrompt 1" in line
