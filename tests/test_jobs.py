"""Job files (``--job``), their placeholders and overrides, and ``batchgen validate``."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from conftest import invoke, write_prompts

from batchgen.jobs import fill_placeholders

ROOT = Path(__file__).parent.parent


def write_job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_committed_sample_job_runs(tmp_path):
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    job = shutil.copy(ROOT / "jobs" / "sample.toml", tmp_path / "sample.toml")

    result = invoke(["run", "--job", str(job), "--rpm", "60000"], key=None)

    assert result.exit_code == 0, result.stderr
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    frame = pl.read_csv(tmp_path / "out" / f"sample-{today}.csv")
    assert frame.height == 50 and set(frame["status"]) == {"ok"}
    assert (tmp_path / "out" / f"sample-{today}.summary.json").exists()


def test_the_committed_nightly_job_is_valid_toml_with_known_keys(tmp_path):
    # Its input is a production path; validate gets as far as reading it and says so.
    result = invoke(["validate", "--job", str(ROOT / "jobs" / "nightly-summaries.toml")])
    assert result.exit_code == 2
    assert "input file not found: /data/exports/tickets-" in result.stderr


def test_the_committed_batch_job_is_valid_toml_with_known_keys():
    result = invoke(["validate", "--job", str(ROOT / "jobs" / "nightly-batch.toml")])
    assert result.exit_code == 2
    assert "input file not found: /data/exports/tickets.parquet" in result.stderr


def test_placeholders_are_filled_in_utc():
    now = datetime(2026, 3, 9, 1, 2, 3, tzinfo=UTC)
    assert (
        fill_placeholders("out/{job}/{date}/{datetime}-{{x}}.csv", job="nightly", now=now)
        == "out/nightly/2026-03-09/2026-03-09T010203Z-{x}.csv"
    )


@pytest.mark.parametrize("where", ["job", "command line"])
def test_an_unknown_placeholder_is_an_error_naming_it(simulator, tmp_path, where):
    source = write_prompts(tmp_path / "in.csv", ["a"])
    if where == "job":
        job = write_job(
            tmp_path / "nightly.toml", f'input = "{source}"\noutput = "out/{{job}}-{{dat}}.csv"\n'
        )
        args = ["run", "--job", str(job)]
    else:
        args = ["run", str(source), "-o", "out/answers-{dat}.csv"]
    result = invoke(args, simulator())
    assert result.exit_code == 2
    assert "unknown placeholder {dat}: did you mean {date}?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*{dat}*"))  # no file literally named after the typo


def test_job_placeholder_needs_a_job(simulator, tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(["run", str(source), "-o", "out/{job}.csv"], simulator())
    assert result.exit_code == 2 and "only a --job file defines" in result.stderr


def test_command_line_overrides_the_job_file(simulator, tmp_path):
    sim = simulator()
    write_prompts(tmp_path / "in.csv", ["a", "b", "c"])
    job = write_job(
        tmp_path / "night.toml",
        """
input = "in.csv"
output = "out/{job}.csv"
model = "qwen-max"
concurrency = 2
limit = 2
max_tokens = 50
[parameters]
presence_penalty = 0.5
seed = 7
""",
    )
    result = invoke(["run", "--job", str(job), "-m", "qwen-turbo", "--limit", "3", "--param", "seed=8"], sim)

    assert result.exit_code == 0, result.stderr
    frame = pl.read_csv(tmp_path / "out" / "night.csv")
    assert frame.height == 3 and set(frame["model"]) == {"qwen-turbo"}


def test_job_file_values_reach_the_request(simulator, tmp_path):
    sim = simulator()
    write_prompts(tmp_path / "in.csv", ["a"])
    job = write_job(
        tmp_path / "j.toml", 'input = "in.csv"\noutput = "o.parquet"\nmax_tokens = 3\nsystem = "Be terse."\n'
    )
    assert invoke(["run", "--job", str(job)], sim).exit_code == 0
    row = pl.read_parquet(tmp_path / "o.parquet").row(0, named=True)
    assert row["finish_reason"] == "length" and row["output_tokens"] == 3


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param(
            'input = "in.csv"\nmodle = "qwen-plus"\n',
            "unknown key 'modle'; did you mean 'model'? known keys:",
            id="unknown-key",
        ),
        pytest.param(
            'input = "in.csv"\nconcurrency = "16"\n',
            "'concurrency' must be a whole number, got a string '16'",
            id="wrong-type",
        ),
        pytest.param(
            'input = "in.csv"\nsimulate = "yes"\n', "'simulate' must be true or false", id="wrong-bool"
        ),
        pytest.param(
            'input = "in.csv"\nconcurrency = 0\n', "'concurrency': 0 is not in the range", id="out-of-range"
        ),
        pytest.param(
            'input = "in.csv"\nendpoint = "fast"\n', "'endpoint': 'fast' is not one of", id="bad-choice"
        ),
        pytest.param(
            'input = "in.csv"\nparameters = 3\n', "'parameters' must be a table", id="parameters-not-table"
        ),
        pytest.param('input = "in.csv"\nfresh = true\n', "unknown key 'fresh'", id="fresh-not-in-jobs"),
        pytest.param(
            'input = "in.csv"\n[parameters]\ntop_p = 5\n', "top_p must be in (0, 1]", id="bad-parameter"
        ),
        pytest.param('input = "in.csv"\nmodel = qwen\n', "is not valid TOML", id="bad-toml"),
    ],
)
def test_bad_job_files(simulator, tmp_path, text, needle):
    sim = simulator()
    write_prompts(tmp_path / "in.csv", ["a"])
    job = write_job(
        tmp_path / "bad.toml", text + 'output = "o.csv"\n' if "[" not in text else 'output = "o.csv"\n' + text
    )
    result = invoke(["run", "--job", str(job)], sim)
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sim.stats.requests == 0 and not (tmp_path / "o.csv").exists()


def test_missing_job_file(tmp_path):
    result = invoke(["run", "--job", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "job file not found" in result.stderr


def test_input_and_output_are_required_without_a_job(tmp_path):
    assert "give the INPUT table" in invoke(["run", "-o", "x.csv"]).stderr
    source = write_prompts(tmp_path / "in.csv", ["a"])
    assert "give -o/--output" in invoke(["run", str(source)]).stderr


def test_validate_passes_without_sending(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    result = invoke(
        ["validate", str(source), "-o", str(tmp_path / "new" / "o.csv"), "--template", "Say {prompt}"], sim
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("batchgen: ok: 2 rows of")
    assert sim.stats.requests == 0 and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("args", "key", "needle"),
    [
        pytest.param(
            ["--template", "{nope}"], "k", "--template field {nope} is not in the input", id="template"
        ),
        pytest.param(["--top-p", "3"], "k", "top_p must be in (0, 1]", id="parameter"),
        pytest.param([], None, "DASHSCOPE_API_KEY", id="no-key"),
    ],
)
def test_validate_fails_with_the_reason(tmp_path, args, key, needle):
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(["validate", str(source), "-o", str(tmp_path / "o.csv"), *args], key=key)
    assert result.exit_code == 2 and needle in result.stderr


def test_validate_simulate_needs_no_key(tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(["validate", str(source), "-o", str(tmp_path / "o.csv"), "--simulate"], key=None)
    assert result.exit_code == 0


def test_a_named_flag_overrides_the_jobs_parameters(simulator, tmp_path):
    sim = simulator()
    write_prompts(tmp_path / "in.csv", ["Tell me a long story about the sea."])
    job = write_job(
        tmp_path / "j.toml", 'input = "in.csv"\noutput = "o.csv"\n[parameters]\nmax_tokens = 50\n'
    )
    result = invoke(["run", "--job", str(job), "--max-tokens", "3"], sim)
    assert result.exit_code == 0, result.stderr
    row = pl.read_csv(tmp_path / "o.csv").row(0, named=True)
    assert row["output_tokens"] == 3 and row["finish_reason"] == "length"


def test_an_unknown_parameter_is_sent_with_a_warning_and_validate_lists_it(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a"])
    job = write_job(
        tmp_path / "j.toml", f'input = "{source}"\noutput = "out.csv"\n[parameters]\ntemprature = 0.2\n'
    )
    checked = invoke(["validate", "--job", str(job), "--param", "presence_penalty=0.5"], sim)
    assert checked.exit_code == 0, checked.stderr
    assert "unknown parameters, sent as they are: temprature (did you mean temperature?)" in checked.stderr
    assert "presence_penalty" not in checked.stderr  # a known one is not flagged

    result = invoke(["run", "--job", str(job)], sim)
    assert result.exit_code == 0
    assert (
        "warning: parameter temprature (did you mean temperature?) is not one DashScope or the OpenAI "
        "API documents: sent as it is" in result.stderr
    )
    assert sim.stats.requests == 1  # still sent: the API grows


def test_a_schema_the_model_cannot_take_is_said_once_at_the_start(simulator, tmp_path):
    sim = simulator()
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"label": {"type": "string"}}}')
    source = write_prompts(tmp_path / "in.csv", ["answer in json: a", "answer in json: b"])
    result = invoke(
        ["run", str(source), "-o", str(tmp_path / "o.csv"), "-m", "qwen-turbo", "--json-schema", str(schema)],
        sim,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("qwen-turbo takes no JSON Schema on DashScope") == 1
    assert result.stderr.index("takes no JSON Schema") < result.stderr.index("2 rows:")


def test_a_misspelt_job_key_gets_a_suggestion(simulator, tmp_path):
    job = write_job(tmp_path / "j.toml", 'input = "in.csv"\noutput = "o.csv"\nconcurency = 4\n')
    result = invoke(["run", "--job", str(job)], simulator())
    assert result.exit_code == 2 and "unknown key 'concurency'; did you mean 'concurrency'?" in result.stderr


def test_the_summary_file_is_readable_like_the_outputs(simulator, tmp_path):
    import os
    import stat

    source = write_prompts(tmp_path / "in.csv", ["a"])
    summary = tmp_path / "s.json"
    assert invoke(["run", str(source), "-o", "o.csv", "--summary", str(summary)], simulator()).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(summary.stat().st_mode) == 0o666 & ~umask
