"""``run --dry-run``: what the run would send, cost and take; nothing is sent or written."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from batchgen.api.models import thinks
from batchgen.batch.lines import MAX_LINES
from batchgen.batch.store import read_held_keys, refuse_forgetting
from batchgen.budget import (
    DEFAULT_OUTPUT_ASSUMPTION,
    IMAGE_TOKENS_MAX,
    IMAGE_TOKENS_TYPICAL,
    count_images,
    count_input_tokens,
    worst_output_tokens,
)
from batchgen.commands.prepare import Prepared
from batchgen.journal import Answers, Entry, journal_path
from batchgen.planning import plan_rows
from batchgen.pricing import ModelPrice, PriceTable
from batchgen.progress import duration


@dataclass
class _Count:
    """The rows a dry run found: the input tokens of each row to send, and the others."""

    tokens: list[int] = field(default_factory=list)
    unsendable: int = 0
    resumed: int = 0
    held: int = 0  # in batches not yet collected: not sent again
    images: int = 0


def dry_run(prepared: Prepared, prices: PriceTable | None) -> int:
    count = _count(prepared)
    price = prices.lookup(prepared.config.model) if prices is not None else None
    lines = [*_rows_and_tokens(prepared, count, price), *_cost(prepared, count, price, prices)]
    n = len(count.tokens)
    rpm, concurrency = prepared.config.rpm, prepared.config.concurrency
    batch = prepared.options.batch
    if batch.batch:
        files = -(-n // MAX_LINES)
        lines.append(
            f"time: within the completion window (--batch-window {batch.batch_window}; often minutes "
            f"to hours), in {files:,} batch{'es' if files != 1 else ''}; no real-time rate limit applies"
        )
    else:
        lines.append(
            f"time: at least {duration(n * 60 / rpm)} at --rpm {rpm:g} "
            f"({n:,} requests, {min(concurrency, max(n, 1)):,} at a time)"
        )
    print("\n".join(lines))
    return 0


def _count(prepared: Prepared) -> _Count:
    """Every row planned as the run would plan it, against the journal (read, not locked)."""
    options, config = prepared.options, prepared.config
    fresh = options.policy.fresh
    path = journal_path(options.output.output_path)
    if fresh:
        refuse_forgetting(options.output.output_path, path)  # as the run would
    previous = {} if fresh else _journal_read_only(path)
    held = set() if fresh else read_held_keys(path)
    messages = config.dialect.messages
    count, offset = _Count(), 0

    def lookup(keys: list[str]) -> dict[str, Answers]:
        return {k: previous[k] for k in keys if k in previous}

    for frame, raw in prepared.source.batches():
        for row in plan_rows(
            frame, raw, offset, config, prepared.spec, id_column=options.input.id_column,
            endpoint=options.server.answered_by, lookup=lookup, retry_errors=options.policy.retry_errors,
        ):  # fmt: skip
            if row.problem is not None:
                count.unsendable += 1
            elif row.earlier is not None:
                count.resumed += 1
            elif row.key in held:
                count.held += 1
            else:
                assert row.body is not None
                count.images += count_images(messages(row.body))
                count.tokens.append(count_input_tokens(config.model, messages(row.body)))
        offset += frame.height
    return count


def _rows_and_tokens(prepared: Prepared, count: _Count, price: ModelPrice | None) -> list[str]:
    config, parameters = prepared.config, prepared.parameters
    route = "OpenAI-compatible API" if config.api == "openai" else f"{config.effective_route} route"
    n, tokens = len(count.tokens), count.tokens
    max_tokens = parameters.get("max_tokens")
    most = _most_output(prepared, price)
    images = (
        f", plus {count.images:,} images (not counted: up to {IMAGE_TOKENS_TYPICAL:,} tokens each "
        f"at the default resolution, {IMAGE_TOKENS_MAX:,} at the highest)"
        if count.images
        else ""
    )
    assumed = (
        f"(--max-tokens {max_tokens:,})"
        if max_tokens
        else f"(no --max-tokens: a stated default; replies may run to {most:,})"
        if most
        else "(no --max-tokens: a stated default)"
    )
    return [
        f"dry run: {n:,} of {prepared.source.total:,} rows would be sent to {config.model} ({route}"
        f"{', in Batch API batches' if prepared.options.batch.batch else ''}"
        f"{', streamed' if config.effective_stream else ''}); {count.resumed:,} already answered in "
        f"the journal, {f'{count.held:,} in batches not yet collected, ' if count.held else ''}"
        f'{count.unsendable:,} not sendable (empty, a missing image, no "json" in JSON mode)',
        f"input tokens: {sum(tokens):,} counted with the Qwen tokenizer "
        f"({(sum(tokens) / n if n else 0):,.0f} a row on average, {max(tokens, default=0):,} at most)"
        + images,
        f"output tokens: assumed {max_tokens or DEFAULT_OUTPUT_ASSUMPTION:,} a row {assumed}",
    ]


def _most_output(prepared: Prepared, price: ModelPrice | None) -> int | None:
    """The longest reply a row may get: the price table's limit, else --max-tokens."""
    parameters = prepared.parameters
    max_tokens = parameters.get("max_tokens")
    if price is None:
        return max_tokens
    mode = thinks(prepared.config.model, parameters)
    return worst_output_tokens(price, max_tokens, mode, parameters.get("thinking_budget"))


def _cost(
    prepared: Prepared, count: _Count, price: ModelPrice | None, prices: PriceTable | None
) -> list[str]:
    model, parameters = prepared.config.model, prepared.parameters
    if price is None or prices is None:
        where = prices.describe() if prices is not None else "no price table for this region"
        return [f"estimated cost: unpriced: {model} has no price in {where} (add it with --prices FILE)"]
    typical = parameters.get("max_tokens") or DEFAULT_OUTPUT_ASSUMPTION
    mode = thinks(model, parameters)
    thinking = mode is not False
    most = _most_output(prepared, price)

    def total(output: int, think: bool, batch: bool) -> Decimal:
        costs = (
            price.cost(input_tokens=c, output_tokens=output, thinking=think, batch=batch)
            for c in count.tokens
        )
        return sum(costs, Decimal(0))

    def estimate(batch: bool) -> tuple[Decimal, Decimal, Decimal]:
        return (
            total(typical, mode is True, batch),
            total(0, False, batch),
            total(most or typical, thinking, batch),
        )

    dearer = ", thinking" if thinking and any(t.output_thinking for t in price.tiers) else ""
    batch = prepared.options.batch.batch
    expected, low, high = estimate(batch)
    other, other_low, other_high = estimate(not batch)
    elsewise = "online (without --batch)" if batch else "through the Batch API (--batch, half price)"
    return [
        f"estimated cost: ${expected:.4f} (range ${low:.4f} with empty replies "
        f"to ${high:.4f} with every reply at {most or typical:,} tokens{dearer})"
        + (" at the Batch API's price (half, no cache discount)" if batch else ""),
        f"  the same rows {elsewise}: ${other:.4f} (range ${other_low:.4f} to ${other_high:.4f})",
        f"prices: {prices.describe()}",
    ]


def _journal_read_only(path: Path) -> dict[str, Answers]:
    """A journal's rows without locking or creating anything (for --dry-run)."""
    if not path.exists():
        return {}
    found: dict[str, Answers] = {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            for k, h, st, f in db.execute("SELECT key, request_hash, status, final FROM rows"):
                found.setdefault(k, {})[h] = Entry(h, st, bool(f), {})
    except sqlite3.Error:
        return {}
    return found
