"""Bad input: one clear line naming the problem and the fix, exit 2, nothing sent, nothing written."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import invoke, write_prompts

EXISTING = "earlier answers, must survive\n"


def run_bad(sim, tmp_path: Path, source: Path | str, *extra: str, key: str | None = "default"):
    out = tmp_path / "out.csv"
    out.write_text(EXISTING)
    args = ["run", str(source), "-o", str(out), *extra]
    result = invoke(args, sim) if key == "default" else invoke(args, sim, key=key)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert out.read_text() == EXISTING  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.csv")]  # no temp left
    assert sim.stats.requests == 0  # nothing was sent
    return lines[0]


def test_missing_file(simulator, tmp_path):
    line = run_bad(simulator(), tmp_path, tmp_path / "nope.csv")
    assert line == f"batchgen: error: input file not found: {tmp_path / 'nope.csv'}"


def test_unknown_extension(simulator, tmp_path):
    source = tmp_path / "prompts.xlsx"
    source.write_text("x")
    line = run_bad(simulator(), tmp_path, source)
    assert "'.xlsx'" in line and ".csv" in line and "--input-format" in line


def test_input_format_override_reads_a_txt_file(simulator, tmp_path):
    sim = simulator()
    source = tmp_path / "prompts.txt"
    source.write_text("prompt\nhello\n")
    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv"), "--input-format", "csv"], sim)
    assert result.exit_code == 0


@pytest.mark.parametrize("content", ["", "id,prompt\n"], ids=["zero-bytes", "header-only"])
def test_empty_table(simulator, tmp_path, content):
    source = tmp_path / "in.csv"
    source.write_text(content)
    line = run_bad(simulator(), tmp_path, source)
    assert "is empty" in line or "has no rows" in line


def test_empty_jsonl(simulator, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("")
    assert "empty" in run_bad(simulator(), tmp_path, source)


def test_missing_prompt_column_lists_the_columns(simulator, tmp_path):
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": [1], "question": ["hi"]}).write_csv(source)
    line = run_bad(simulator(), tmp_path, source)
    assert line == (
        "batchgen: error: prompt column 'prompt' is not in the input; its columns are: "
        "id, question (choose one with --prompt-column or write a --template)"
    )


def test_non_utf8_csv(simulator, tmp_path):
    source = tmp_path / "in.csv"
    source.write_bytes("prompt\nCaf\u00e9 cr\u00e8me\n".encode("latin-1"))
    line = run_bad(simulator(), tmp_path, source)
    assert "not UTF-8" in line and "offset 10" in line and "iconv" in line


def test_malformed_jsonl_line_is_named(simulator, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",,}\n{"prompt": "d"}\n')
    line = run_bad(simulator(), tmp_path, source)
    assert "line 3 is not valid JSON" in line


def test_template_naming_a_missing_column(simulator, tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["x"])
    line = run_bad(simulator(), tmp_path, source, "--template", "Summarize: {text}")
    assert line == (
        "batchgen: error: --template field {text} is not in the input; its columns are: id, prompt"
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["--temperature", "2"], "temperature must be in [0, 2), got 2.0", id="temperature"),
        pytest.param(["--top-p", "0"], "top_p must be in (0, 1]", id="top-p"),
        pytest.param(["--max-tokens", "0"], "max_tokens must be at least 1", id="max-tokens"),
        pytest.param(["--seed", "-1"], "seed must be in [0, 2^31-1]", id="seed"),
        pytest.param(
            ["--param", "presence_penalty=5"], "presence_penalty must be in [-2, 2]", id="param-range"
        ),
        pytest.param(["--param", "n"], "--param 'n' is not KEY=VALUE", id="param-shape"),
        pytest.param(["--param", 'top_p="high"'], "top_p must be a number", id="param-type"),
        pytest.param(["--param", "stream=true"], "use --stream or --no-stream", id="param-stream"),
        pytest.param(["--max-tokens", "5", "--param", "max_tokens=6"], "both", id="param-twice"),
        pytest.param(["--system", "a", "--system-column", "b"], "keep one", id="system-twice"),
        pytest.param(["--template", "{prompt}", "--prompt-column", "prompt"], "keep one", id="prompt-twice"),
        pytest.param(["--template", "no fields"], "names no column", id="template-no-field"),
        pytest.param(["--template", "{0}"], "must name a column", id="template-positional"),
        pytest.param(["--id-column", "nope"], "--id-column 'nope' is not in the input", id="id-missing"),
    ],
)
def test_invalid_parameter_values(simulator, tmp_path, args, needle):
    source = write_prompts(tmp_path / "in.csv", ["x"])
    assert needle in run_bad(simulator(), tmp_path, source, *args)


def test_duplicate_ids(simulator, tmp_path):
    source = tmp_path / "in.csv"
    pl.DataFrame({"key": ["a", "b", "a"], "prompt": ["x", "y", "z"]}).write_csv(source)
    line = run_bad(simulator(), tmp_path, source, "--id-column", "key")
    assert "not unique" in line and "'a' appears 2 times" in line


def test_click_rejects_out_of_range_concurrency(simulator, tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["x"])
    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv"), "-c", "0"], simulator())
    assert result.exit_code == 2 and "Invalid value for '-c' / '--concurrency'" in result.stderr


def test_column_collision(simulator, tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["x"], status=["new"])
    line = run_bad(simulator(), tmp_path, source)
    assert "input column 'status' has the name of an output column: rename it" in line


def test_no_api_key_names_the_variable_and_simulate(simulator, tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["x"])
    line = run_bad(simulator(), tmp_path, source, key=None)
    assert "DASHSCOPE_API_KEY" in line and "--simulate" in line


def test_output_same_as_input(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["x"])
    result = invoke(["run", str(source), "-o", str(source)], sim)
    assert result.exit_code == 2 and "would overwrite the input" in result.stderr
    assert sim.stats.requests == 0


def test_unknown_output_extension(simulator, tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["x"])
    result = invoke(["run", str(source), "-o", str(tmp_path / "out.xlsx")], simulator())
    assert result.exit_code == 2 and "cannot tell the output format" in result.stderr


def test_unknown_region(simulator, tmp_path, monkeypatch):
    monkeypatch.setenv("DASHSCOPE_API_REGION", "mars-1")
    source = write_prompts(tmp_path / "in.csv", ["x"])
    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv")])
    assert result.exit_code == 2 and "unknown region 'mars-1'" in result.stderr
