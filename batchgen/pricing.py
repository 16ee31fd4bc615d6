"""What requests cost: a versioned price table, shipped as data, and the billing rules.

Rules (``shared/dashscope-protocol.md``): a request is billed entirely at the tier its input
tokens fall in; implicit-cache hits cost a fifth of the input price; a reply produced in
thinking mode is billed at the thinking output price where the model has one. A model the
table does not know is *unpriced*: its tokens are reported and its cost is ``None``, never 0.
A line of a Batch API batch costs half of all that, with no cache discount. Money is
computed in ``Decimal`` so totals add up to the cent.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from batchgen.errors import UsageError

ENV_PRICES = "BATCHGEN_PRICES"
MILLION = Decimal(1_000_000)
BATCH_RATIO = Decimal("0.5")  # the Batch API's price, of the real-time one
# Dated snapshots and aliases bill like their family unless listed themselves.
_SNAPSHOT = re.compile(r"-(latest|\d{4}-\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True, slots=True)
class Tier:
    up_to: int  # inclusive, in input tokens of the request
    input: Decimal
    output: Decimal
    output_thinking: Decimal | None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    name: str  # the table's entry (the family for a snapshot)
    tiers: tuple[Tier, ...]
    max_output_tokens: int | None

    def tier(self, input_tokens: int) -> Tier:
        for tier in self.tiers:
            if input_tokens <= tier.up_to:
                return tier
        return self.tiers[-1]  # longer than the table knows: the dearest tier, never cheaper

    def cost(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        thinking: bool = False,
        cached_ratio: Decimal = Decimal("0.2"),
        batch: bool = False,
    ) -> Decimal:
        """One request's cost, at the tier its input tokens fall in."""
        return charge(
            self.tier(input_tokens),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached_tokens,
            thinking=thinking,
            cached_ratio=cached_ratio,
            batch=batch,
        )


def charge(
    tier: Tier,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    thinking: bool = False,
    cached_ratio: Decimal = Decimal("0.2"),
    batch: bool = False,
) -> Decimal:
    """The billing formula, the one every cost batchgen reports goes through: the run's spend,
    ``--max-cost``'s reservations, ``--dry-run``'s estimate (via ``ModelPrice.cost``) and
    ``batchgen cost`` (on token sums of rows that share a tier, where the formula is linear).
    ``batch``: a Batch API line, half of the tier's prices (thinking output too), no cache."""
    cached = 0 if batch else min(max(cached_tokens, 0), input_tokens)
    out_price = tier.output_thinking if thinking and tier.output_thinking is not None else tier.output
    cost = (
        (input_tokens - cached) * tier.input + cached * tier.input * cached_ratio + output_tokens * out_price
    ) / MILLION
    return cost * BATCH_RATIO if batch else cost


def billed_thinking(reasoning_tokens: int | None, reasoning: str | None) -> bool:
    """Whether a finished row is billed at the thinking output price: it spent reasoning tokens
    or carries reasoning text. ``thinking_billed_expr`` is the same rule over a table."""
    return bool(reasoning_tokens or reasoning)


def thinking_billed_expr(columns: Collection[str]) -> Any:
    """``billed_thinking`` as a polars expression over an output table's ``columns``."""
    import polars as pl

    tokens = (
        pl.col("reasoning_tokens").cast(pl.Int64, strict=False).fill_null(0) > 0
        if "reasoning_tokens" in columns
        else pl.lit(False)
    )
    text = (
        pl.col("reasoning").cast(pl.String).fill_null("").str.len_chars() > 0
        if "reasoning" in columns
        else pl.lit(False)
    )
    return tokens | text


@dataclass(frozen=True)
class PriceTable:
    """One region's prices from a table file, with where they came from."""

    version: str
    as_of: str
    region: str
    source: str
    cached_ratio: Decimal
    batch_ratio: Decimal
    models: Mapping[str, ModelPrice]
    overrides: str | None = None  # the --prices file merged over the built-in table

    def lookup(self, model: str) -> ModelPrice | None:
        """The model's prices: its own entry, else its family's (snapshots, ``-latest``)."""
        if model in self.models:
            return self.models[model]
        family = _SNAPSHOT.sub("", model)
        return self.models.get(family)

    def describe(self) -> str:
        extra = f", overridden by {self.overrides}" if self.overrides else ""
        empty = ": it has no prices for this region" if not self.models else ""
        return f"batchgen price table {self.version} (as of {self.as_of}, region {self.region}{empty}{extra})"


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{where} must be a number, got {value!r}")
    return Decimal(str(value))


def _model(name: str, entry: Mapping[str, Any], where: str) -> ModelPrice:
    tiers_raw = entry.get("tiers")
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise UsageError(f"{where}: model {name!r} needs a non-empty 'tiers' list")
    tiers = []
    for i, t in enumerate(tiers_raw):
        at = f"{where}: {name} tier {i + 1}"
        if not isinstance(t, dict) or not isinstance(t.get("up_to"), int):
            raise UsageError(f"{at} needs 'up_to' (input tokens, a whole number)")
        thinking = t.get("output_thinking")
        tiers.append(
            Tier(
                t["up_to"],
                _decimal(t.get("input"), f"{at} 'input'"),
                _decimal(t.get("output"), f"{at} 'output'"),
                None if thinking is None else _decimal(thinking, f"{at} 'output_thinking'"),
            )
        )
    if [t.up_to for t in tiers] != sorted({t.up_to for t in tiers}):
        raise UsageError(f"{where}: {name}'s tiers must have increasing 'up_to'")
    limit = entry.get("max_output_tokens")
    return ModelPrice(name, tuple(tiers), limit if isinstance(limit, int) else None)


def _read(path: Path | None) -> dict[str, Any]:
    try:
        if path is None:
            return tomllib.loads(resources.files("batchgen").joinpath("data/prices.toml").read_text("utf-8"))
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"price file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"price file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read the price file {path}: {exc.strerror or exc}") from None


def load_prices(
    overrides: str | os.PathLike[str] | None = None,
    *,
    region: str = "intl",
    environ: Mapping[str, str] = os.environ,
) -> PriceTable:
    """The built-in table for ``region``, with ``overrides`` (or ``$BATCHGEN_PRICES``) merged in."""
    base = _read(None)
    override_path = overrides or environ.get(ENV_PRICES) or None
    extra = _read(Path(override_path)) if override_path else {}
    regions = {**base.get("regions", {})}
    extra_regions = extra.get("regions", {})
    where = str(override_path) if override_path else "the built-in price table"
    if not isinstance(extra_regions, dict) or not all(
        isinstance(t, dict) and isinstance(t.get("models", {}), dict) for t in extra_regions.values()
    ):
        raise UsageError(
            f"{where}: [regions.NAME] must be tables, each with a [regions.NAME.models] "
            "table (see batchgen/data/prices.toml)"
        )
    for name, table in extra_regions.items():
        merged = {**regions.get(name, {}), **{k: v for k, v in table.items() if k != "models"}}
        merged["models"] = {**regions.get(name, {}).get("models", {}), **table.get("models", {})}
        regions[name] = merged
    # A region the table has no prices for is priced at nothing known: every row unpriced,
    # its tokens still reported, never $0 and never a refused report.
    chosen = regions.get(region, {})
    models = {
        name: _model(name, entry if isinstance(entry, dict) else {}, where)
        for name, entry in chosen.get("models", {}).items()
    }
    version = str(extra.get("version") or base["version"])
    if override_path and "version" not in extra:
        version = f"{base['version']}+{Path(override_path).name}"
    return PriceTable(
        version=version,
        as_of=str(extra.get("as_of") or base["as_of"]),
        region=region,
        source=str(chosen.get("source", "")),
        cached_ratio=_decimal(
            extra.get("cached_input_ratio", base["cached_input_ratio"]), "cached_input_ratio"
        ),
        batch_ratio=_decimal(extra.get("batch_ratio", base["batch_ratio"]), "batch_ratio"),
        models=models,
        overrides=str(override_path) if override_path else None,
    )


def region_of(base_url: str) -> str:
    """The price region of an endpoint: the public hosts and workspace hosts are known."""
    host = base_url.split("//", 1)[-1].split("/", 1)[0]
    for needle, region in (
        ("dashscope-intl", "intl"),
        ("ap-southeast-1", "intl"),
        ("dashscope-us", "us"),
        ("us-east-1", "us"),
        ("cn-hongkong", "hk"),
        ("cn-beijing", "cn"),
        ("dashscope.aliyuncs.com", "cn"),
    ):
        if needle in host:
            return region
    return "intl"
