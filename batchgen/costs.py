"""``batchgen cost``: what output files cost, from their token columns and the price table.

Billing is linear within a (model, tier, thinking) class, so token sums are taken per class in
polars (exact integers, fast on millions of rows) and money is computed from those sums in
``Decimal``: the report adds up to the cent however rows are grouped.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl

from batchgen.errors import UsageError
from batchgen.pricing import PriceTable, charge, thinking_billed_expr
from batchgen.tables import read_metadata, read_table

GROUPS = ("model", "day", "status", "finish_reason", "job", "billing_mode")
TOKEN_COLUMNS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")
NEEDED = ("model", "status", "input_tokens", "output_tokens")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq", ".jsonl", ".ndjson")


@dataclass
class Line:
    """One row of the report: a group (or the total) and what it used and cost."""

    key: dict[str, str | None]
    rows: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_COLUMNS, 0))
    cost: Decimal = Decimal(0)
    unpriced_rows: int = 0  # rows with usage whose model has no price

    @property
    def all_unpriced(self) -> bool:
        """Every billed row's model is unknown: there is no cost to show, and it is not 0."""
        return self.unpriced_rows > 0 and self.cost == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.key,
            "rows": self.rows,
            **self.tokens,
            "cost_usd": None if self.all_unpriced else exact(self.cost),
            "unpriced_rows": self.unpriced_rows,
        }


def exact(cost: Decimal) -> str:
    """Money as text to 1e-8 USD: every price in the table is exact at that scale."""
    return format(cost.quantize(Decimal("1e-8")), "f")


@dataclass
class Report:
    by: tuple[str, ...]
    lines: list[Line]
    total: Line
    prices: PriceTable
    unpriced_models: dict[str, dict[str, int]]  # model -> rows, tokens
    files: list[dict[str, Any]]


def expand(paths: list[str]) -> list[Path]:
    """Files as given, or glob patterns the shell did not expand (quoted, or from cron)."""
    found: list[Path] = []
    for pattern in paths:
        if os.path.exists(pattern):
            found.append(Path(pattern))
            continue
        # A pattern such as out/* also matches journals, locks and sidecars: keep tables only,
        # and not the .partial- tables of stopped runs, whose rows the final output repeats.
        matches = [
            Path(m)
            for m in sorted(glob.glob(pattern, recursive=True))
            if Path(m).suffix.lower() in TABLE_SUFFIXES
            and Path(m).is_file()
            and ".partial-" not in Path(m).name
        ]
        if not matches:
            raise UsageError(f"no output file matches {pattern}")
        found.extend(matches)
    return list(dict.fromkeys(found))


def _load(path: Path) -> pl.DataFrame:
    frame = read_table(path)
    missing = [c for c in NEEDED if c not in frame.columns]
    if missing:
        raise UsageError(f"{path} is not a batchgen output: it has no {', '.join(missing)} column(s)")
    meta = read_metadata(path)
    _check_token_cells(path, frame)
    columns = [
        pl.col("model").cast(pl.String),
        pl.col("status").cast(pl.String),
        (
            pl.col("finish_reason").cast(pl.String)
            if "finish_reason" in frame.columns
            else pl.lit(None, pl.String)
        ).alias("finish_reason"),
        *[
            (
                pl.col(c).cast(pl.String).cast(pl.Float64).cast(pl.Int64)
                if c in frame.columns
                else pl.lit(None, pl.Int64)
            )
            .fill_null(0)
            .alias(c)
            for c in TOKEN_COLUMNS
        ],
        thinking_billed_expr(frame.columns).alias("thinking"),
        (
            pl.col("billing_mode").cast(pl.String).fill_null("online")
            if "billing_mode" in frame.columns
            else pl.lit("online", pl.String)
        ).alias("billing_mode"),
        (
            pl.col("finished_at").cast(pl.String).str.slice(0, 10)
            if "finished_at" in frame.columns
            else pl.lit(None, pl.String)
        ).alias("day"),
        pl.lit(meta.get("job") or path.stem.split(".")[0], pl.String).alias("job"),
    ]
    return frame.select(columns)


def _check_token_cells(path: Path, frame: pl.DataFrame) -> None:
    """Token counts must be whole numbers: a cell that is not must not silently cost $0."""
    for column in TOKEN_COLUMNS:
        if column not in frame.columns:
            continue
        text = frame.get_column(column).cast(pl.String)
        numbers = text.cast(pl.Float64, strict=False)
        bad = int(
            (text.is_not_null() & (numbers.is_null() | (numbers != numbers.floor()) | (numbers < 0))).sum()
        )
        if bad:
            raise UsageError(
                f"{path}: {bad} cell(s) of {column} are not whole token counts "
                "(edited in a spreadsheet?): fix them or re-export the file"
            )


def _tier_index(frame: pl.DataFrame, prices: PriceTable) -> pl.DataFrame:
    """Add each row's price tier (by its own input tokens) and whether its model is priced."""
    tier = pl.lit(None, pl.Int64)
    for model in frame.get_column("model").drop_nulls().unique().to_list():
        price = prices.lookup(model)
        if price is None:
            continue
        index = pl.lit(0, pl.Int64)
        for boundary in (t.up_to for t in price.tiers[:-1]):
            index = index + (pl.col("input_tokens") > boundary).cast(pl.Int64)
        tier = pl.when(pl.col("model") == model).then(index).otherwise(tier)
    return frame.with_columns(tier.alias("tier"))


def build_report(paths: list[str], prices: PriceTable, by: tuple[str, ...]) -> Report:
    files = expand(paths)
    if not files:
        raise UsageError("give at least one output file")
    frames, info = [], []
    for path in files:
        frame = _load(path)
        meta = read_metadata(path)
        frames.append(frame)
        info.append({"path": str(path), "rows": frame.height, "prices_version": meta.get("prices_version")})
    data = _tier_index(pl.concat(frames, how="vertical_relaxed"), prices)
    has_usage = (pl.col("input_tokens") + pl.col("output_tokens")) > 0
    classes = list(dict.fromkeys([*by, "model", "tier", "thinking", "billing_mode"]))
    sums = data.group_by(classes, maintain_order=True).agg(
        pl.len().alias("rows"),
        *[pl.col(c).sum() for c in TOKEN_COLUMNS],
        has_usage.sum().alias("billed_rows"),
    )

    lines: dict[tuple[Any, ...], Line] = {}
    total = Line({k: None for k in by})
    unpriced: dict[str, dict[str, int]] = {}
    for row in sums.iter_rows(named=True):
        key = tuple(row[k] for k in by)
        line = lines.setdefault(key, Line(dict(zip(by, key, strict=True))))
        for target in (line, total):
            target.rows += row["rows"]
            for c in TOKEN_COLUMNS:
                target.tokens[c] += row[c]
        price = prices.lookup(row["model"]) if row["model"] is not None else None
        if price is None:
            if row["billed_rows"]:
                line.unpriced_rows += row["billed_rows"]
                total.unpriced_rows += row["billed_rows"]
                entry = unpriced.setdefault(row["model"] or "(none)", {"rows": 0, "tokens": 0})
                entry["rows"] += row["billed_rows"]
                entry["tokens"] += row["input_tokens"] + row["output_tokens"]
            continue
        cost = charge(
            price.tiers[row["tier"]],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            cached_tokens=row["cached_tokens"],
            thinking=row["thinking"],
            cached_ratio=prices.cached_ratio,
            batch=row["billing_mode"] == "batch",
        )
        line.cost += cost
        total.cost += cost
    ordered = sorted(lines.values(), key=lambda ln: tuple((v is None, str(v)) for v in ln.key.values()))
    return Report(by, ordered, total, prices, unpriced, info)


# -- rendering ---------------------------------------------------------------------------------
HEADERS = ("rows", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cost_usd")


def _money(line: Line) -> str:
    if line.all_unpriced:
        return "unpriced"
    text = f"{line.cost:.6f}"
    return f"{text} + unpriced" if line.unpriced_rows else text


def _cells(line: Line, by: tuple[str, ...], label: str | None = None) -> list[str]:
    if label is not None:  # the totals row: its label, then blanks under the other keys
        keys = [label, *[""] * (len(by) - 1)]
    else:
        keys = ["-" if line.key[k] is None else str(line.key[k]) for k in by]
    return [*keys, f"{line.rows:,}", *[f"{line.tokens[c]:,}" for c in TOKEN_COLUMNS], _money(line)]


def render(report: Report, fmt: str) -> str:
    """The report as ``table``, ``markdown``, ``csv`` or ``json`` text."""
    if fmt == "json":
        return _render_json(report)
    if fmt == "csv":
        return _render_csv(report)
    return _render_text(report, markdown=fmt == "markdown")


def _render_json(report: Report) -> str:
    by = report.by
    return json.dumps(
        {
            "prices": {
                "version": report.prices.version,
                "as_of": report.prices.as_of,
                "region": report.prices.region,
                "overrides": report.prices.overrides,
            },
            "by": list(by),
            "groups": [line.as_dict() for line in report.lines],
            "total": {k: v for k, v in report.total.as_dict().items() if k not in by},
            "unpriced_models": report.unpriced_models,
            "files": report.files,
        },
        indent=2,
        ensure_ascii=False,
    )


def _render_csv(report: Report) -> str:
    by = report.by

    def csv_row(line: Line, keys: list[str]) -> list[str]:
        return [
            *keys,
            str(line.rows),
            *[str(line.tokens[c]) for c in TOKEN_COLUMNS],
            "" if line.all_unpriced else exact(line.cost),
            str(line.unpriced_rows),
        ]

    rows = [
        csv_row(line, ["" if line.key[k] is None else str(line.key[k]) for k in by]) for line in report.lines
    ]
    rows.append(csv_row(report.total, ["TOTAL", *[""] * (len(by) - 1)]))
    frame = pl.DataFrame(rows, schema=[*by, *HEADERS, "unpriced_rows"], orient="row")
    return frame.write_csv().rstrip("\n")


def _render_text(report: Report, *, markdown: bool) -> str:
    by = report.by
    headers = [*by, *HEADERS]
    body = [_cells(line, by) for line in report.lines]
    total = _cells(report.total, by, label="TOTAL")
    notes = [f"prices: {report.prices.describe()}"]
    for model, entry in sorted(report.unpriced_models.items()):
        notes.append(
            f"unpriced: {model} ({entry['rows']:,} row{'s' if entry['rows'] != 1 else ''}, "
            f"{entry['tokens']:,} tokens) "
            f"has no {report.prices.region} price in the table; add it with --prices FILE"
        )
    if markdown:
        lines = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---" if i < len(by) else "---:" for i in range(len(headers))) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("| " + " | ".join(f"**{c}**" if c else "" for c in total) + " |")
        return "\n".join([*lines, "", *notes])
    widths = [max(len(r[i]) for r in [headers, *body, total]) for i in range(len(headers))]

    def fmt_row(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < len(by) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_row(headers), rule, *map(fmt_row, body), rule, fmt_row(total), "", *notes])
