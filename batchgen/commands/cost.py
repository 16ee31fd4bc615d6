"""``batchgen cost``: the report on stdout; which price table and any mismatch on stderr."""

from __future__ import annotations

import logging

from batchgen.costs import GROUPS, build_report, expand, render
from batchgen.errors import UsageError
from batchgen.pricing import load_prices
from batchgen.tables import read_metadata

log = logging.getLogger("batchgen")


def cost_command(*, files: list[str], by: str, fmt: str, prices_path: str | None, region: str | None) -> None:
    keys = tuple(k.strip() for k in by.split(",") if k.strip())
    unknown = [k for k in keys if k not in GROUPS]
    if unknown or not keys:
        raise UsageError(f"--by {by!r}: group by one or more of {', '.join(GROUPS)}")
    paths = expand(files)
    recorded = [read_metadata(p) for p in paths]
    region = region or next((m["region"] for m in recorded if m.get("region")), "intl")
    prices = load_prices(prices_path, region=region)
    for path, meta in zip(paths, recorded, strict=True):
        if meta.get("region") and meta["region"] != prices.region:
            log.warning(
                "%s was run in region %s; this report applies %s prices", path, meta["region"], prices.region
            )
        version = meta.get("prices_version")
        if version and version != prices.version:
            log.warning(
                "%s was run with price table %s; this report applies %s", path, version, prices.version
            )
    report = build_report([str(p) for p in paths], prices, keys)
    print(render(report, fmt))
