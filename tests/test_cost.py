"""Prices, ``batchgen cost``, ``--dry-run`` and the ``--max-cost`` guard.

Expected amounts are computed by hand in the comments (USD per 1M tokens from
batchgen/data/prices.toml), not by the code under test.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from conftest import invoke, write_prompts

from batchgen.pricing import load_prices
from batchgen.tables import read_metadata

FIXTURE = Path(__file__).parent / "data" / "cost_fixture.csv"
PRICES = load_prices()


def cost(model: str, **tokens: int) -> Decimal:
    price = PRICES.lookup(model)
    assert price is not None
    return price.cost(cached_ratio=PRICES.cached_ratio, **tokens)


@pytest.mark.parametrize(
    ("model", "tokens", "expected"),
    [
        # 32,768 input tokens is still qwen3-max's first tier: 32768 × 1.20 + 1000 × 6.00
        ("qwen3-max", {"input_tokens": 32768, "output_tokens": 1000}, "0.0453216"),
        # one more token and the WHOLE request moves up: 32769 × 2.40 + 1000 × 12.00
        ("qwen3-max", {"input_tokens": 32769, "output_tokens": 1000}, "0.0906456"),
        # 256K = 262,144 is qwen-plus's first tier: 262144 × 0.40 + 100 × 1.20
        ("qwen-plus", {"input_tokens": 262144, "output_tokens": 100}, "0.1049776"),
        # 262,145: 262145 × 1.20 + 100 × 3.60
        ("qwen-plus", {"input_tokens": 262145, "output_tokens": 100}, "0.314934"),
        # thinking output at 4.00, not 1.20: 1000 × 0.40 + 1000 × 4.00
        ("qwen-plus", {"input_tokens": 1000, "output_tokens": 1000, "thinking": True}, "0.0044"),
        # 600 cached at 20 %: 400 × 0.40 + 600 × 0.08 + 0
        ("qwen-plus", {"input_tokens": 1000, "output_tokens": 0, "cached_tokens": 600}, "0.000208"),
        # no separate thinking price: thinking output bills at the output price, 1000 × 6.40
        ("qwen-max", {"input_tokens": 0, "output_tokens": 1000, "thinking": True}, "0.0064"),
    ],
)
def test_billing_rules(model, tokens, expected):
    assert cost(model, **tokens) == Decimal(expected)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("qwen-plus-2025-07-28", "qwen-plus"),
        ("qwen-max-latest", "qwen-max"),
        ("qwen-turbo-2025-04-28", "qwen-turbo"),
        ("qwen3-max", "qwen3-max"),
    ],
)
def test_snapshots_and_aliases_bill_as_their_family(name, family):
    assert PRICES.lookup(name).name == family


@pytest.mark.parametrize("name", ["my-finetune", "gpt-4o", "qwen-plusplus"])
def test_unknown_models_are_unpriced_not_free(name):
    assert PRICES.lookup(name) is None


def test_price_table_is_versioned_and_sourced():
    assert PRICES.version and PRICES.as_of and PRICES.region == "intl"
    assert PRICES.source.startswith("https://www.alibabacloud.com/")


def test_report_by_model_matches_the_hand_computed_figures():
    result = invoke(["cost", str(FIXTURE), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    groups = {g["model"]: g for g in report["groups"]}
    # rows 1, 2, 4 billed; 9 (moderated, no usage) and 10 (skipped) cost nothing:
    # 1000×0.40 + 500×1.20 = 1000 µ$; 1000×0.40 + 1000×0.08 + 1000×4.00 = 4480 µ$;
    # 262145×1.20 + 100×3.60 = 314934 µ$  -> 320414 µ$
    assert groups["qwen-plus"] == {
        "model": "qwen-plus",
        "rows": 5,
        "input_tokens": 265145,
        "cached_tokens": 1000,
        "output_tokens": 1600,
        "reasoning_tokens": 800,
        "cost_usd": "0.32041400",
        "unpriced_rows": 0,
    }
    assert groups["qwen-plus-2025-07-28"]["cost_usd"] == "0.10497760"  # 262144×0.40 + 100×1.20
    assert groups["qwen3-max"]["cost_usd"] == "0.13596720"  # 45321.6 + 90645.6 µ$
    assert groups["qwen-max-latest"]["cost_usd"] == "0.00048000"  # 100×1.60 + 50×6.40
    assert groups["qwen-turbo"]["cost_usd"] == "0.00055000"  # 1000×0.05 + 1000×0.50 (thinking)
    assert groups["my-finetune"]["cost_usd"] is None  # unpriced, never $0
    assert report["unpriced_models"] == {"my-finetune": {"rows": 1, "tokens": 500}}
    assert report["total"] == {
        "rows": 11,
        "input_tokens": 594226,
        "cached_tokens": 1000,
        "output_tokens": 4950,
        "reasoning_tokens": 1300,
        "cost_usd": "0.56238880",
        "unpriced_rows": 1,
    }
    assert report["prices"]["version"] == PRICES.version


def test_report_by_day_as_csv():
    result = invoke(["cost", str(FIXTURE), "--by", "day", "--format", "csv"])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "day,rows,input_tokens,cached_tokens,output_tokens,reasoning_tokens,cost_usd,unpriced_rows",
        "2026-11-01,3,4000,1000,2500,1300,0.00603000,0",  # 1000 + 4480 + 550 µ$
        "2026-11-02,7,590226,0,2450,0,0.55635880,1",
        '"",1,0,0,0,0,0.00000000,0',  # the skipped row has no finished_at
        "TOTAL,11,594226,1000,4950,1300,0.56238880,1",
    ]


def test_table_and_markdown_formats():
    table = invoke(["cost", str(FIXTURE)]).stdout.splitlines()
    assert table[0].split() == [
        "model",
        "rows",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_usd",
    ]
    total = next(line for line in table if line.startswith("TOTAL"))
    assert total.split() == ["TOTAL", "11", "594,226", "1,000", "4,950", "1,300", "0.562389", "+", "unpriced"]
    assert any(line.split()[:2] == ["my-finetune", "1"] and line.endswith("unpriced") for line in table)
    assert any(line.startswith("prices: batchgen price table") for line in table)
    markdown = invoke(["cost", str(FIXTURE), "--by", "status", "--format", "markdown"]).stdout
    assert "| ok | 9 |" in markdown and "| **TOTAL** |" in markdown


def test_prices_file_extends_the_table(tmp_path):
    extra = tmp_path / "prices.toml"
    extra.write_text(
        'version = "mine-1"\n[regions.intl.models.my-finetune]\n'
        "tiers = [{ up_to = 1000000, input = 1.0, output = 2.0 }]\n"
    )
    result = invoke(["cost", str(FIXTURE), "--prices", str(extra), "--format", "json"])
    report = json.loads(result.stdout)
    mine = next(g for g in report["groups"] if g["model"] == "my-finetune")
    assert mine["cost_usd"] == "0.00070000"  # 300 × 1.0 + 200 × 2.0 = 700 µ$
    assert report["total"]["cost_usd"] == "0.56308880" and report["unpriced_models"] == {}
    assert report["prices"]["version"] == "mine-1"


def test_mixed_files_and_globs(simulator, tmp_path):
    sim = simulator()
    write_prompts(tmp_path / "in.csv", ["a", "b"])
    for name, model in (("a.parquet", "qwen-plus"), ("b.jsonl", "qwen-turbo")):
        assert invoke(["run", "in.csv", "-o", f"out/{name}", "-m", model], sim).exit_code == 0
    result = invoke(["cost", "out/*", "--by", "model", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert {g["model"]: g["rows"] for g in report["groups"]} == {"qwen-plus": 2, "qwen-turbo": 2}
    assert len(report["files"]) == 2  # journals, locks and sidecars are not tables


def test_run_records_the_price_table_it_used(simulator, tmp_path):
    sim = simulator()
    write_prompts(tmp_path / "in.csv", ["a"])
    for name in ("o.parquet", "o.csv"):
        assert invoke(["run", "in.csv", "-o", name], sim).exit_code == 0
        meta = read_metadata(tmp_path / name)
        assert meta["prices_version"] == PRICES.version and meta["region"] == "intl"
        assert meta["model"] == "qwen-plus"
    assert (tmp_path / "o.csv.meta.json").exists()


def test_cost_warns_when_the_run_used_another_table(tmp_path):
    out = tmp_path / "o.csv"
    out.write_bytes(FIXTURE.read_bytes())
    (tmp_path / "o.csv.meta.json").write_text('{"prices_version": "2024.01-1"}')
    result = invoke(["cost", str(out)])
    assert result.exit_code == 0
    assert f"was run with price table 2024.01-1; this report applies {PRICES.version}" in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--by", "color"], "group by one or more of"),
    ],
)
def test_cost_usage_errors(args, needle):
    result = invoke(["cost", str(FIXTURE), *args])
    assert result.exit_code == 2 and needle in result.stderr


def test_cost_of_a_file_that_is_not_an_output(tmp_path):
    write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(["cost", str(tmp_path / "in.csv")])
    assert result.exit_code == 2 and "is not a batchgen output" in result.stderr


def test_dry_run_counts_and_estimates_and_sends_nothing(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["Hello world", "How are you today?", ""])
    out = tmp_path / "o.csv"

    result = invoke(
        ["run", str(source), "-o", str(out), "--dry-run", "--max-tokens", "100", "--rpm", "60"], sim
    )

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dry run: 2 of 3 rows would be sent to qwen-plus")
    assert "1 not sendable" in lines[0]
    # Qwen tokenizer: "Hello world" = 2 tokens, "How are you today?" = 5; + 5 per message + 3.
    assert lines[1].startswith("input tokens: 23 counted with the Qwen tokenizer")
    # expected: 23 × 0.40 + 200 × 1.20 = 249.2 µ$; empty replies 9.2 µ$; worst: thinking is
    # not switched off, and reasoning is not capped by --max-tokens, so each reply may bill
    # 100 + 32,768 (qwen-plus's longest) tokens at 4.00: 9.2 + 2 × 32868 × 4.00 = 262953.2 µ$
    assert lines[3] == (
        "estimated cost: $0.0002 (range $0.0000 with empty replies to $0.2630 "
        "with every reply at 32,868 tokens, thinking)"
    )
    assert lines[-1] == "time: at least 2s at --rpm 60 (2 requests, 2 at a time)"
    assert sim.stats.requests == 0
    assert list(tmp_path.iterdir()) == [source]  # no output, journal, lock or summary


def test_dry_run_skips_rows_the_journal_answered(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b", "c"])
    assert invoke(["run", str(source), "-o", "o.csv", "--limit", "2"], sim).exit_code == 0
    result = invoke(["run", str(source), "-o", "o.csv", "--dry-run"], sim)
    assert result.stdout.startswith("dry run: 1 of 3 rows would be sent")
    assert "2 already answered in the journal" in result.stdout


def test_dry_run_needs_no_key(tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    result = invoke(["run", str(source), "-o", "o.csv", "--dry-run"], key=None)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("dry run: 2 of 2 rows would be sent to qwen-plus")
    assert not list(tmp_path.glob("o.csv*"))  # wrote nothing


def test_dry_run_of_an_unpriced_model(tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(
        ["run", str(source), "-o", "o.csv", "--dry-run", "-m", "my-finetune", "--simulate"], key=None
    )
    assert result.exit_code == 0
    assert "estimated cost: unpriced: my-finetune has no price" in result.stdout


def test_max_cost_stops_the_run_before_the_budget_is_passed(simulator, tmp_path):
    sim = simulator(latency=0.02)
    source = write_prompts(tmp_path / "in.csv", [f"Question {i}: why?" for i in range(60)])
    out = tmp_path / "o.csv"
    args = [
        "run",
        str(source),
        "-o",
        str(out),
        "--max-tokens",
        "200",
        "--disable-thinking",
        "--rpm",
        "60000",
        "--max-cost",
        "0.002",
        "--summary",
        str(tmp_path / "s.json"),
    ]

    result = invoke(args, sim)

    assert result.exit_code == 5
    assert "stopped by --max-cost: spent $" in result.stderr
    frame = pl.read_csv(out)
    summary = json.loads((tmp_path / "s.json").read_text())
    spent = Decimal(summary["cost"]["spent_usd"])
    assert Decimal(0) < spent <= Decimal("0.002")
    ok = int((frame["status"] == "ok").sum())
    assert 0 < ok < 60 and (frame["status"] == "skipped").sum() == 60 - ok
    assert sim.stats.requests == ok  # nothing sent beyond what was answered
    # Resumable: a larger budget finishes the job without re-sending the answered rows.
    again = invoke([*args[:-4], "--max-cost", "1"], sim)
    assert again.exit_code == 0 and sim.stats.requests == 60


def test_max_cost_needs_a_price(tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(
        ["run", str(source), "-o", "o.csv", "--max-cost", "1", "-m", "my-finetune", "--simulate"], key=None
    )
    assert result.exit_code == 2 and "--max-cost needs the price of my-finetune" in result.stderr


def test_progress_and_summary_show_the_cost(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    result = invoke(["run", str(source), "-o", "o.csv", "--summary", "s.json"], sim)
    assert "spent" in result.stderr.splitlines()[-1]
    summary = json.loads((tmp_path / "s.json").read_text())
    frame = pl.read_csv(tmp_path / "o.csv")
    expected = sum(
        Decimal(i) * Decimal("0.40") + Decimal(o) * Decimal("1.20")
        for i, o in zip(frame["input_tokens"], frame["output_tokens"], strict=True)
    )
    assert Decimal(summary["cost"]["spent_usd"]) == expected / 1_000_000


def test_max_cost_counts_reasoning_beyond_max_tokens(simulator, tmp_path):
    """--max-tokens caps the answer, not the reasoning: the guard must budget both."""
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", [f"Think about {i}." for i in range(30)])
    result = invoke(
        [
            "run",
            str(source),
            "-o",
            "o.csv",
            "--enable-thinking",
            "--max-tokens",
            "1",
            "--thinking-budget",
            "40",
            "--max-cost",
            "0.0005",
            "--rpm",
            "60000",
            "--summary",
            "s.json",
        ],
        sim,
    )
    assert result.exit_code == 5
    spent = Decimal(json.loads((tmp_path / "s.json").read_text())["cost"]["spent_usd"])
    assert Decimal(0) < spent <= Decimal("0.0005")


def test_a_budget_below_one_request_says_why(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(["run", str(source), "-o", "o.csv", "--max-cost", "0.01"], sim)
    assert result.exit_code == 5 and sim.stats.requests == 0
    # 32,768 answer + 32,768 reasoning tokens at 4.00 = $0.2621 (plus a few input tokens)
    assert "the next request could cost up to $0.2621" in result.stderr
    # What makes the worst case that large is reasoning, which --max-tokens does not cap.
    assert "--disable-thinking, or a --thinking-budget, lowers that" in result.stderr
    off = invoke(["run", str(source), "-o", "o.csv", "--max-cost", "0.01", "--disable-thinking"], sim)
    assert off.exit_code == 5 and "; --max-tokens lowers that)" in off.stderr  # 32,768 x 1.20 = $0.039
    fits = invoke(
        [
            "run",
            str(source),
            "-o",
            "o.csv",
            "--max-cost",
            "0.01",
            "--disable-thinking",
            "--max-tokens",
            "500",
        ],
        sim,
    )
    assert fits.exit_code == 0 and sim.stats.requests == 1


def test_globs_skip_the_partial_tables_of_stopped_runs(tmp_path):
    (tmp_path / "out.csv").write_bytes(FIXTURE.read_bytes())
    (tmp_path / "out.partial-20261101T000000Z.csv").write_bytes(FIXTURE.read_bytes())
    report = json.loads(invoke(["cost", str(tmp_path / "*"), "--format", "json"]).stdout)
    assert report["total"]["rows"] == 11 and len(report["files"]) == 1


def test_token_cells_that_are_not_whole_numbers_are_an_error(tmp_path):
    text = FIXTURE.read_text().replace(",1000,500,1500,", ",1000.0,500.5,1500,", 1)
    (tmp_path / "o.csv").write_text(text)
    result = invoke(["cost", str(tmp_path / "o.csv")])
    assert result.exit_code == 2
    assert "1 cell(s) of output_tokens are not whole token counts" in result.stderr


def test_cost_warns_when_the_run_was_in_another_region(tmp_path):
    (tmp_path / "o.csv").write_bytes(FIXTURE.read_bytes())
    (tmp_path / "o.csv.meta.json").write_text('{"region": "cn"}')
    result = invoke(["cost", str(tmp_path / "o.csv"), "--region", "intl"])
    assert "was run in region cn; this report applies intl prices" in result.stderr


@pytest.mark.parametrize(
    "text",
    ['regions = "x"', "[regions.intl]\nmodels = 5", "version = ["],
    ids=["regions-not-table", "models-not-table", "bad-toml"],
)
def test_malformed_price_files_are_one_line(tmp_path, text):
    bad = tmp_path / "p.toml"
    bad.write_text(text)
    result = invoke(["cost", str(FIXTURE), "--prices", str(bad)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("region", ["cn", "hk"])
def test_a_region_without_prices_reports_every_row_unpriced(region):
    result = invoke(["cost", str(FIXTURE), "--region", region, "--format", "json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["prices"]["region"] == region
    assert report["total"]["cost_usd"] is None  # unknown, never $0
    fixture = pl.read_csv(FIXTURE)
    billed = fixture.filter((pl.col("input_tokens") > 0) | (pl.col("output_tokens") > 0)).height
    assert report["total"]["unpriced_rows"] == billed == 9  # rows without usage cost nothing
    assert report["total"]["input_tokens"] == 594_226  # tokens are still reported
    text = invoke(["cost", str(FIXTURE), "--region", region])
    assert text.exit_code == 0 and f"has no {region} price in the table" in text.stdout


def test_a_cn_run_reports_its_spend_as_unpriced_rows(simulator, tmp_path):
    from conftest import write_prompts

    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b"])
    out, summary = tmp_path / "out.csv", tmp_path / "summary.json"
    result = invoke(["run", str(source), "-o", str(out), "--region", "cn", "--summary", str(summary)], sim)
    assert result.exit_code == 0, result.stderr
    cost = json.loads(summary.read_text())["cost"]
    assert cost == {"spent_usd": "0", "total_usd": "0", "unpriced_rows": 2}
    assert "+ 2 unpriced rows" in result.stderr


@pytest.mark.parametrize(
    ("reasoning_tokens", "reasoning", "expected"),
    [
        (None, None, False),
        (0, "", False),
        (0, None, False),
        (12, None, True),
        (None, "hm", True),
        (3, "x", True),
    ],
)
def test_the_run_and_the_report_agree_on_which_rows_bill_as_thinking(reasoning_tokens, reasoning, expected):
    from batchgen.pricing import billed_thinking, thinking_billed_expr

    frame = pl.DataFrame(
        {"reasoning_tokens": [reasoning_tokens], "reasoning": [reasoning]},
        schema={"reasoning_tokens": pl.Int64, "reasoning": pl.String},
    )
    assert billed_thinking(reasoning_tokens, reasoning) is expected
    assert frame.select(thinking_billed_expr(frame.columns)).item() is expected


@pytest.mark.parametrize(
    ("model", "tokens", "expected"),
    [
        # half of 1000 × 0.40 + 500 × 1.20 = half of 0.001
        ("qwen-plus", {"input_tokens": 1000, "output_tokens": 500}, "0.0005"),
        # no cache discount in batch: the 500 cached tokens bill as input, half of the same 0.001
        ("qwen-plus", {"input_tokens": 1000, "output_tokens": 500, "cached_tokens": 500}, "0.0005"),
        # thinking output at half the thinking price: half of 2000 × 0.40 + 1000 × 4.00
        ("qwen-plus", {"input_tokens": 2000, "output_tokens": 1000, "thinking": True}, "0.0024"),
        # the tier is still chosen by the input tokens: half of 40000 × 2.40 + 1000 × 12.00
        ("qwen3-max", {"input_tokens": 40000, "output_tokens": 1000}, "0.054"),
    ],
)
def test_batch_lines_bill_at_half_the_tier_price_without_cache(model, tokens, expected):
    assert cost(model, batch=True, **tokens) == Decimal(expected)


def test_cost_report_prices_each_row_by_its_billing_mode(tmp_path):
    rows = pl.DataFrame(
        {
            "model": ["qwen-plus", "qwen-plus", "qwen-plus", "qwen-plus"],
            "status": ["ok", "ok", "ok", "error"],
            "input_tokens": [1000, 1000, 2000, None],
            "output_tokens": [500, 500, 1000, None],
            "cached_tokens": [500, 500, 0, None],
            "reasoning_tokens": [None, None, 600, None],
            "billing_mode": ["online", "batch", "batch", "batch"],
        }
    )
    rows.write_csv(tmp_path / "out.csv")
    report = json.loads(
        invoke(["cost", str(tmp_path / "out.csv"), "--by", "billing_mode", "--format", "json"]).stdout
    )
    by_mode = {g["billing_mode"]: Decimal(g["cost_usd"]) for g in report["groups"]}
    # online: 500 × 0.40 + 500 × 0.08 (cached) + 500 × 1.20 = 0.00084
    # batch: 0.0005 (no cache discount) + 0.0024 (thinking, half of 800 + 4000); the error is free
    assert by_mode == {"online": Decimal("0.00084"), "batch": Decimal("0.0029")}
    assert Decimal(report["total"]["cost_usd"]) == Decimal("0.00374")
