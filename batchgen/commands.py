"""What each CLI command does, as plain functions of already-merged options (no click here)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import math
import os
import signal
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl

from batchgen import __version__
from batchgen.budget import (
    DEFAULT_OUTPUT_ASSUMPTION,
    IMAGE_TOKENS_MAX,
    IMAGE_TOKENS_TYPICAL,
    Budget,
    count_images,
    count_input_tokens,
    thinks,
    worst_output_tokens,
)
from batchgen.config import (
    MAX_CONCURRENCY,
    RunConfig,
    api_key_from_env,
    compatible_url,
    dashscope_endpoint,
    no_key_message,
    parse_param_options,
    resolve_base_url,
    unknown_parameters,
)
from batchgen.errors import BatchgenError, UsageError
from batchgen.journal import Answers, Entry, Journal, LockedError, check_unlocked, journal_path
from batchgen.jsonmode import load_schema, mentions_json, response_format
from batchgen.logs import event
from batchgen.planning import plan_resume
from batchgen.pool import RunControl
from batchgen.pricing import PriceTable, load_prices, region_of
from batchgen.progress import JsonProgress, Progress, duration, summary_line
from batchgen.prompts import PromptSpec, RowProblem, build_messages, check_columns
from batchgen.protocol import COMPATIBLE_PREFIX, NATIVE_PREFIX, route_for_model
from batchgen.results import RunResult, check_collisions, exit_code
from batchgen.runner import arun_batches
from batchgen.tables import (
    Source,
    TableWriter,
    check_writable,
    format_of,
    metadata_path,
    open_source,
    read_metadata,
    write_atomically,
)

log = logging.getLogger("batchgen")

# The demo simulator answers like a real endpoint: a little latency, no faults.
SIMULATE_LATENCY = 0.2
SIMULATE_JITTER = 0.1


def _generation_parameters(options: Mapping[str, Any], schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only what the user set, under DashScope's names; ``--param`` fills in the rest."""
    params = options["params"]
    parameters = dict(params) if isinstance(params, Mapping) else parse_param_options(params)
    named = {
        "temperature": options["temperature"],
        "top_p": options["top_p"],
        "top_k": options["top_k"],
        "max_tokens": options["max_tokens"],
        "seed": options["seed"],
        "stop": list(options["stop"]) or None,
        "enable_thinking": options["enable_thinking"],
        "thinking_budget": options["thinking_budget"],
    }
    for key, value in named.items():
        if value is not None:
            if key in parameters:
                raise UsageError(f"{key} is set both by its own option and by --param; keep one")
            parameters[key] = value
    for name in unknown_parameters(parameters):
        log.warning("parameter %s is not one DashScope or the OpenAI API documents: sent as it is", name)
    fmt = response_format(
        options["model"],
        parameters,
        json_mode=bool(options["json"]),
        schema=schema,
        name=Path(options["json_schema"]).stem if options["json_schema"] else "reply",
        dashscope=_to_dashscope(options),
    )
    if fmt is not None:
        if "response_format" in parameters:
            raise UsageError("response_format is set both by --json/--json-schema and by --param; keep one")
        parameters["response_format"] = fmt
        if schema is not None and fmt["type"] != "json_schema":
            log.warning(
                "--json-schema: %s takes no JSON Schema on DashScope (only qwen-plus, qwen-max, "
                "qwen-flash, qwen3-max and qwen3.5+ do, and not while thinking): sending JSON mode "
                'instead, so the prompts must say "json"; each reply is still checked against the '
                "schema (reply_json_valid)",
                options["model"],
            )
    return parameters


def _check_id_column(source: Source, column: str | None) -> None:
    """The journal keys rows by --id-column: it must exist, be complete and be unique."""
    if column is None:
        return
    if column not in source.columns:
        raise UsageError(
            f"--id-column {column!r} is not in the input; its columns are: {', '.join(source.columns)}"
        )
    nulls, duplicate, count = source.column_stats(column)
    if nulls:
        raise UsageError(f"--id-column {column!r} has {nulls} empty value(s): every row needs a key")
    if duplicate is not None:
        raise UsageError(
            f"--id-column {column!r} is not unique (e.g. {duplicate!r} appears "
            f"{count} times): pick a unique key column"
        )


@dataclass
class Prepared:
    """Everything checked before a run: what ``validate`` reports and ``run`` uses."""

    source: Source
    spec: PromptSpec
    parameters: dict[str, Any]
    output_format: str
    options: dict[str, Any] = field(repr=False)
    schema: dict[str, Any] | None = field(default=None, repr=False)  # --json-schema, read once


def _prepare(options: dict[str, Any]) -> Prepared:
    input_path: Path = options["input_path"]
    output_path: Path = options["output_path"]
    output_format = format_of(output_path, role="output")
    if input_path.resolve() == output_path.resolve():
        raise UsageError(f"the output {output_path} would overwrite the input: choose another name")
    spec = PromptSpec(
        prompt_column=options["prompt_column"],
        template=options["template"],
        system=options["system_prompt"],
        system_column=options["system_column"],
        messages_column=options["messages_column"],
        image_columns=tuple(dict.fromkeys(options["image_columns"])),
        image_root=input_path.resolve().parent,
    )
    schema = load_schema(Path(options["json_schema"])) if options["json_schema"] else None
    parameters = _generation_parameters(options, schema)
    _check_route(options, spec)
    separator = options["separator"]
    if separator is not None and format_of(input_path, options["input_format"], role="input") != "csv":
        raise UsageError(f"--separator is for CSV input; {input_path} is not read as CSV: drop it")
    source = open_source(
        input_path,
        options["input_format"],
        limit=options["limit"],
        messages_column=spec.messages_column,
        separator=separator,
    )
    check_columns(spec, source.columns, source.schema)
    check_collisions(source.columns)
    _check_id_column(source, options["id_column"])
    if options["concurrency"] > MAX_CONCURRENCY:
        log.warning(
            "--concurrency %s is more than is useful: batchgen keeps at most %s requests in flight",
            f"{options['concurrency']:,}",
            f"{MAX_CONCURRENCY:,}",
        )
    if options["simulate"] and options["base_url"]:
        raise UsageError("--simulate runs against a local simulator; drop --base-url")
    if not options["simulate"] and not options["dry_run"] and not _key(options):
        raise UsageError(no_key_message(options["api"], dashscope=_to_dashscope(options)))
    # Template errors that only a row can show (a format spec a value cannot take) show now.
    sample = build_messages(spec, source.head(100))
    if _to_dashscope(options):  # DashScope's rule; other servers decide for themselves
        _check_json_word(parameters, sample)
    return Prepared(source, spec, parameters, output_format, options, schema)


def _check_route(options: Mapping[str, Any], spec: PromptSpec) -> None:
    """Images go only to the multimodal route; the OpenAI API has one route for all."""
    if options["api"] == "openai" and options["endpoint"]:
        raise UsageError(
            "--endpoint chooses a route of the native API; the OpenAI-compatible "
            "API (--api openai) has one: drop --endpoint"
        )
    if not _to_dashscope(options):
        return  # another server: its models are its own business
    route = options["endpoint"] or route_for_model(options["model"])
    if spec.image_columns and route == "text":
        raise UsageError(
            f"{options['model']} is a text model and reads no images: pick a "
            "vision model for --image-column (e.g. -m qwen3-vl-plus or qwen-vl-max)"
        )


def _check_json_word(parameters: Mapping[str, Any], sample: list[Any]) -> None:
    """JSON mode with no "json" in any of the first rows: the prompt needs it, not every row."""
    fmt = parameters.get("response_format")
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_object"):
        return
    rows = [m for m in sample if not isinstance(m, RowProblem)]
    if rows and not any(mentions_json(m) for m in rows):
        raise UsageError(
            'JSON mode needs the word "json" in the messages (DashScope refuses '
            "requests without it), and none of the first rows has it: add it to "
            "the prompt, the --template or --system, e.g. --system 'Answer in JSON.'"
        )


def _config(prepared: Prepared, base_url: str, key: str) -> RunConfig:
    o = prepared.options
    return RunConfig(
        api_key=key,
        base_url=base_url,
        model=o["model"],
        api=o["api"],
        route=o["endpoint"],
        stream=o["stream"],
        json_schema=prepared.schema,
        dashscope=_to_dashscope(o),
        workspace=(o["workspace"] or None) if _to_dashscope(o) else None,
        parameters=prepared.parameters,
        concurrency=min(o["concurrency"], MAX_CONCURRENCY),
        rpm=o["rpm"],
        tpm=o["tpm"],
        adaptive=not o["fixed_rate"],
        max_attempts=o["max_attempts"],
        timeout=o["timeout"],
    )


@contextlib.contextmanager
def _endpoint(options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """The base URL and key to use: the user's, or a simulator started for this run."""
    if not options["simulate"]:
        yield _base_url(options), _key(options)
        return
    from batchgen.simulator import SimulatorConfig, SimulatorThread

    # The simulator gets its own demo key: a real key never leaves for a local test server.
    sim_config = SimulatorConfig(latency=SIMULATE_LATENCY, jitter=SIMULATE_JITTER)
    with SimulatorThread(sim_config) as simulator:
        url = simulator.base_url
        yield (compatible_url(url) if options["api"] == "openai" else url), sim_config.key


def _base_url(options: Mapping[str, Any]) -> str:
    return resolve_base_url(options["base_url"], options["region"], api=options["api"])


def _to_dashscope(options: Mapping[str, Any]) -> bool:
    return options["simulate"] or dashscope_endpoint(options["base_url"], options["api"])


def _key(options: Mapping[str, Any]) -> str:
    return api_key_from_env(options["api"], dashscope=_to_dashscope(options))


def _check_config(prepared: Prepared) -> RunConfig:
    """Every setting checked (ranges, NaN, the key's characters) before anything is touched."""
    o = prepared.options
    # The simulator takes its own key; a dry run sends nothing, so it needs none (one that is
    # set is still checked).
    key = "checked" if o["simulate"] or (o["dry_run"] and not _key(o)) else _key(o)
    return _config(prepared, "http://checked.invalid", key)


def validate_command(**options: Any) -> int:
    """``batchgen validate``: every check ``run`` makes before sending, and nothing more."""
    prepared = _prepare(options)
    config = _check_config(prepared)
    where = (
        "http://127.0.0.1:<free port>" + (COMPATIBLE_PREFIX if config.api == "openai" else NATIVE_PREFIX)
        if options["simulate"]
        else _base_url(options)
    )
    base_url = replace(config, base_url=where).url
    stream = " streamed" if config.effective_stream else ""
    _budget(options, _prices(options), prepared.parameters)
    output: Path = options["output_path"]
    _check_output_folder(output)
    check_unlocked(output)  # exit 4, as run would
    unknown = unknown_parameters(prepared.parameters)
    sendable = prepared.source.total
    log.info(
        "ok: %s rows of %s (columns: %s) would go%s to %s on %s; output %s%s",
        f"{sendable:,}",
        options["input_path"],
        ", ".join(prepared.source.columns),
        stream,
        config.model,
        base_url,
        output,
        f"; unknown parameters, sent as they are: {', '.join(unknown)}" if unknown else "",
        extra=event(
            "validated",
            rows=sendable,
            model=config.model,
            route=config.effective_route,
            output=str(output),
            unknown_parameters=unknown,
        ),
    )
    return 0


def _check_output_folder(output: Path) -> None:
    """The output's folder exists and is writable, or its nearest existing parent is."""
    if output.is_dir():
        raise UsageError(f"output {output} is a directory: give a file name, e.g. {output}/answers.csv")
    folder = output.parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the output {output}: {folder} is not writable")


async def _run_with_signals(
    prepared: Prepared,
    config: RunConfig,
    journal: Journal,
    grace: float,
    prices: PriceTable | None,
    budget: Budget | None,
    writer: TableWriter,
) -> RunResult:
    """The run, with SIGINT/SIGTERM stopping it gracefully and a second signal at once."""
    loop = asyncio.get_running_loop()
    control = RunControl()

    def on_signal(name: str) -> None:
        if control.stopping:
            log.warning(
                "%s again: stopping now; the journal keeps every finished row",
                name,
                extra=event("stop_now", signal=name),
            )
            control.stop_now()
            return
        log.warning(
            "%s: sending no more requests; letting those in flight finish (up to %gs); "
            "send it again (Ctrl-C) to stop at once",
            name,
            grace,
            extra=event("stopping", signal=name, grace=grace),
        )
        control.stop(name, grace)

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig.name)
    o = prepared.options
    progress: Progress | JsonProgress | None
    if o["quiet"]:
        progress = None
    elif o["log_format"] == "json":
        progress = JsonProgress(log)
    else:
        progress = Progress()
    try:
        source = prepared.source
        return await arun_batches(
            source.batches(),
            source.total,
            config,
            prepared.spec,
            write=writer.write,
            id_column=o["id_column"],
            endpoint=_endpoint_name(o),
            journal=journal,
            retry_errors=o["retry_errors"],
            control=control,
            prices=prices,
            budget=budget,
            progress=progress,
        )
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run_command(**options: Any) -> int:
    """``batchgen run``: check, lock, resume from the journal, answer, write; the exit code."""
    started = datetime.now(UTC)
    summary = RunSummary(options, started)
    if options["dry_run"]:
        summary.options = {**options, "summary_path": None}  # a dry run writes nothing
    try:
        code = _run(options, summary)
    except LockedError:
        raise  # the summary belongs to the run holding the lock: leave it alone
    except BatchgenError as err:
        summary.write(exit_code=err.exit_code, error=str(err))
        raise
    summary.write(exit_code=code)
    return code


def _region(options: Mapping[str, Any]) -> str:
    """The region whose prices apply: the simulator bills like the default (intl)."""
    if options["simulate"]:
        return "intl"
    return options["region"] or region_of(resolve_base_url(options["base_url"], None))


def _prices(options: Mapping[str, Any]) -> PriceTable:
    """The price table for the run's region (empty for a region it has no prices for: unpriced rows)."""
    return load_prices(options["prices_path"], region=_region(options))


def _budget(
    options: Mapping[str, Any], prices: PriceTable | None, parameters: Mapping[str, Any]
) -> Budget | None:
    if options["max_cost"] is None:
        return None
    if not math.isfinite(options["max_cost"]):
        raise UsageError(f"--max-cost must be a number of US dollars, got {options['max_cost']}")
    model = options["model"]
    price = prices.lookup(model) if prices is not None else None
    if prices is None or price is None:
        where = prices.describe() if prices is not None else "the price table"
        raise UsageError(
            f"--max-cost needs the price of {model}, which {where} does not have: add it with --prices FILE"
        )
    return Budget(
        Decimal(str(options["max_cost"])),
        price,
        prices,
        max_tokens=parameters.get("max_tokens"),
        thinking=thinks(model, parameters),
        thinking_budget=parameters.get("thinking_budget"),
    )


def _run(options: dict[str, Any], summary: RunSummary) -> int:
    prepared = _prepare(options)
    prices = _prices(options)
    budget = _budget(options, prices, prepared.parameters)
    _check_config(prepared)
    if options["dry_run"]:
        return _dry_run(prepared, prices)
    output: Path = options["output_path"]
    check_writable(output)
    created = not journal_path(output).exists()
    with Journal(journal_path(output)) as journal:
        journal.lock(output)
        try:
            return _run_locked(prepared, journal, prices, budget, summary)
        except UsageError:
            if created:  # refused before any row was recorded: leave no journal or lock behind
                journal.remove_if_empty()
            raise


# What an output records of the run that wrote it; a run that differs in one of these writes
# a different table, so an existing one is kept aside rather than silently replaced.
REQUEST_SET = ("input", "rows", "model", "endpoint")


def _endpoint_name(options: Mapping[str, Any]) -> str:
    """Whom the run asks, as the journal and the output record it."""
    return "simulator" if options["simulate"] else _base_url(options).rstrip("/")


def _run_locked(
    prepared: Prepared,
    journal: Journal,
    prices: PriceTable | None,
    budget: Budget | None,
    summary: RunSummary,
) -> int:
    options = prepared.options
    output: Path = options["output_path"]
    journal.clean_leftovers(output)
    if options["fresh"]:
        journal.discard()
    journal.open()
    metadata = {
        "batchgen_version": __version__,
        "run_id": summary.run_id,
        "model": options["model"],
        "job": options.get("job") or "",
        "region": _region(options),
        "prices_version": prices.version if prices else "",
        "input": str(Path(options["input_path"]).resolve()),
        "rows": str(prepared.source.total),
        "endpoint": _endpoint_name(options),
    }
    replaced: tuple[Path, str] | None = None
    writer = TableWriter(
        output.parent,
        output.name,
        prepared.output_format,  # type: ignore[arg-type]
        metadata,
    )
    try:
        with _endpoint(options) as (url, key):
            config = _config(prepared, url, key)
            if journal.has_rows():
                plan = plan_resume(
                    prepared.source.batches(), config, prepared.spec, id_column=options["id_column"],
                    endpoint=metadata["endpoint"], lookup=journal.lookup,
                    retry_errors=options["retry_errors"],
                )  # fmt: skip
                log.info("%s", plan.line())
            result = asyncio.run(
                _run_with_signals(prepared, config, journal, options["grace"], prices, budget, writer)
            )
        summary.result = result
        target = output
        finished = result.fatal is None and result.stopped is None and result.stats.ok > 0
        if output.exists() and not finished:
            # A stopped, refused or all-failed run never replaces earlier answers.
            target = _beside(output, "partial")
        # A signal now would leave no output for answers already paid: hold it until the
        # table is in place (it is delivered, and honoured, right after).
        with _signals_deferred():
            replaced = _keep_other_request_set(output, metadata) if target == output else None
            writer.commit(target)
            if target == output and not options["fresh"]:  # --fresh: the journal forgot them
                _remove_superseded(output, metadata)
    except (OSError, pl.exceptions.PolarsError) as exc:
        writer.discard()
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise BatchgenError(
            f"could not write {output} ({reason}); every answer is kept in "
            f"{journal.path}: fix that and run the same command again to "
            "write it (nothing is sent twice)"
        ) from None
    except BaseException:
        writer.discard()
        raise
    summary.output = target
    stats = result.stats
    if result.fatal is not None:
        log.error(
            "%s",
            result.fatal,
            extra=event("fatal", code=result.fatal.code, http_status=result.fatal.http_status),
        )
    if target != output:
        log.warning("kept the existing %s; this run's table is %s", output, target)
    if replaced is not None:
        log.warning(
            "%s held the answers of another request set (%s); it is kept as %s, and the journal "
            "keeps its answers: running that command again sends nothing",
            output,
            replaced[1],
            replaced[0],
        )
    if result.stopped == "budget" and budget is not None:
        lower = (
            "--disable-thinking, or a --thinking-budget, lowers that: reasoning is billed on top "
            "of --max-tokens, up to the model's longest output"
            if budget.thinking and budget.thinking_budget is None
            else "--max-tokens or a lower --thinking-budget lowers that"
            if budget.thinking
            else "--max-tokens lowers that"
        )
        refused = (
            f" (the next request could cost up to ${budget.refused:.4f}; {lower})"
            if budget.refused is not None
            else ""
        )
        log.warning(
            "stopped by --max-cost: spent $%s of $%s%s; %s rows not sent are marked "
            "skipped; run the same command with a higher --max-cost to continue",
            f"{budget.spent:.4f}",
            options["max_cost"],
            refused,
            f"{stats.skipped:,}",
            extra=event("stopped", reason="budget", spent_usd=str(budget.spent), skipped=stats.skipped),
        )
    elif result.stopped is not None:
        log.warning(
            "stopped by %s: %s rows not answered are marked skipped; run the same "
            "command again to finish them (journal: %s)",
            result.stopped,
            f"{stats.skipped:,}",
            journal.path,
            extra=event("stopped", signal=result.stopped, skipped=stats.skipped),
        )
    if stats.error_codes:  # exit 3 says why without opening the table
        log.info(
            "errors by code: %s",
            ", ".join(f"{code} {n:,}" for code, n in stats.error_codes.most_common()),
        )
    log.info(
        "%s · wrote %s",
        summary_line(stats),
        target,
        extra=event("summary", **summary.counts(), output=str(target)),
    )
    return exit_code(result)


def _beside(output: Path, kind: str) -> Path:
    """A new name next to ``output``: ``NAME.<kind>-<UTC time>.EXT``, never an existing file's."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        name = output.with_name(f"{output.stem}.{kind}-{stamp}{f'-{n}' if n > 1 else ''}{output.suffix}")
        if not name.exists():
            return name
    raise BatchgenError(f"too many {kind} tables beside {output}: remove some")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then are delivered as they came.

    A Python-level handler, not a blocked mask: the polars and HTTP threads alive by now
    would take a blocked signal with its default action. Python runs handlers on the main
    thread whichever thread the kernel picked.
    """
    caught: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda number, _frame: caught.append(number)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for number in caught:
            signal.raise_signal(number)


def _other_request_set(recorded: Mapping[str, str], metadata: Mapping[str, str]) -> list[str]:
    """What a table recorded that this run's table would not hold: another input, model or
    endpoint, or more rows (a full table about to be replaced by a --limit run's)."""
    differs = [k for k in ("input", "model", "endpoint") if recorded.get(k) and recorded[k] != metadata[k]]
    rows = recorded.get("rows", "")
    if rows.isdigit() and int(rows) > int(metadata["rows"]):
        differs.append("rows")
    return differs


def _held_by(recorded: Mapping[str, str], metadata: Mapping[str, str]) -> bool:
    """Whether a table's answers are all in the journal and this run's rows: it recorded its
    whole request set (a table without one, or from before batchgen kept one, may hold the
    only copy of an answer) and it is not another set."""
    return all(recorded.get(k) for k in REQUEST_SET) and not _other_request_set(recorded, metadata)


def _keep_other_request_set(output: Path, metadata: Mapping[str, str]) -> tuple[Path, str] | None:
    """An existing output written for another input, model or endpoint, or with more rows, is
    renamed ``NAME.replaced-<UTC time>.EXT`` (with its sidecar) before this run's table takes
    its place."""
    if not output.exists():
        return None
    recorded = read_metadata(output)
    differs = _other_request_set(recorded, metadata)
    if not differs:
        return None
    kept = _beside(output, "replaced")
    os.replace(output, kept)
    with contextlib.suppress(FileNotFoundError):
        os.replace(metadata_path(output), metadata_path(kept))
    what = ", ".join(f"{k} {recorded[k]}" for k in differs)
    return kept, what


def _remove_superseded(output: Path, metadata: Mapping[str, str]) -> None:
    """Tables beside ``output`` that it now holds again: the ``.partial-`` tables of stopped runs
    and the ``.replaced-`` copies of the same request set, no larger (every answer they held is
    in the journal, so in ``output``), and sidecars left without their table. Tables of another
    request set, or that recorded none, may hold answers ``output`` lacks: they stay."""
    stem, suffix = glob.escape(output.stem), glob.escape(output.suffix)
    for kind in ("partial", "replaced"):
        for table in output.parent.glob(f"{stem}.{kind}-*{suffix}"):
            if not _held_by(read_metadata(table), metadata):
                continue
            for path in (table, metadata_path(table)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for sidecar in output.parent.glob(f"{stem}.{kind}-*.meta.json"):
            if not sidecar.with_name(sidecar.name.removesuffix(".meta.json")).exists():
                with contextlib.suppress(FileNotFoundError):
                    sidecar.unlink()


@dataclass
class RunSummary:
    """``--summary PATH``: the run as JSON, for cron wrappers and dashboards."""

    options: dict[str, Any]
    started: datetime
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    result: RunResult | None = None
    output: Path | None = None

    def counts(self) -> dict[str, Any]:
        if self.result is None:
            return {}
        s = self.result.stats
        return {
            "rows": {
                "total": s.total,
                "ok": s.ok,
                "error": s.error,
                "skipped": s.skipped,
                "resumed": s.resumed,
                "changed": s.changed,
            },
            "tokens": {
                "input": s.input_tokens,
                "output": s.output_tokens,
                "sent_input": s.sent_input_tokens,
                "sent_output": s.sent_output_tokens,
            },
            "cost": {"spent_usd": str(s.spent), "total_usd": str(s.cost), "unpriced_rows": s.unpriced_rows}
            if s.priced
            else None,
            "attempts": s.attempts,
            "error_codes": dict(s.error_codes.most_common()),
        }

    def write(self, *, exit_code: int, error: str | None = None) -> None:
        path = self.options.get("summary_path")
        if path is None:
            return
        ended = datetime.now(UTC)
        summary = {
            "run_id": self.run_id,
            "job": self.options.get("job"),
            "started_at": self.started.isoformat(),
            "ended_at": ended.isoformat(),
            "duration_s": round((ended - self.started).total_seconds(), 3),
            "input": str(self.options.get("input_path")),
            "output": str(self.output or self.options.get("output_path")),
            "model": self.options.get("model"),
            "exit_code": exit_code,
            "error": error,
            "stopped_by": self.result.stopped if self.result else None,
            **self.counts(),
        }
        text = json.dumps(summary, indent=2, ensure_ascii=False).encode() + b"\n"
        try:  # atomic, and readable like the outputs (0666 less the umask), not mkstemp's 0600
            write_atomically(Path(path), lambda f: f.write(text))
        except OSError as exc:
            log.warning("could not write the summary %s: %s", path, exc.strerror or exc)


def cost_command(*, files: list[str], by: str, fmt: str, prices_path: str | None, region: str | None) -> None:
    """``batchgen cost``: the report on stdout; which price table and any mismatch on stderr."""
    from batchgen.costs import GROUPS, build_report, expand, render
    from batchgen.pricing import load_prices
    from batchgen.tables import read_metadata

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


def _dry_run(prepared: Prepared, prices: PriceTable | None) -> int:
    """``run --dry-run``: what the run would send, cost and take; nothing is sent or written."""
    from batchgen.planning import messages_of, plan_rows

    o = prepared.options
    model = o["model"]
    config = _check_config(prepared)
    route = "OpenAI-compatible API" if config.api == "openai" else f"{config.effective_route} route"
    previous = {} if o["fresh"] else _journal_read_only(journal_path(o["output_path"]))
    endpoint = _endpoint_name(o)
    counts: list[int] = []
    empty = resumed = offset = images = 0
    for frame, raw in prepared.source.batches():
        for row in plan_rows(
            frame, raw, offset, config, prepared.spec, id_column=o["id_column"], endpoint=endpoint,
            lookup=lambda keys: {k: previous[k] for k in keys if k in previous},
            retry_errors=o["retry_errors"],
        ):  # fmt: skip
            if row.problem is not None:
                empty += 1
            elif row.earlier is not None:
                resumed += 1
            else:
                assert row.body is not None
                images += count_images(messages_of(row.body))
                counts.append(count_input_tokens(model, messages_of(row.body)))
        offset += frame.height
    n = len(counts)
    price = prices.lookup(model) if prices is not None else None
    max_tokens = prepared.parameters.get("max_tokens")
    typical = max_tokens or DEFAULT_OUTPUT_ASSUMPTION
    mode = thinks(model, prepared.parameters)
    thinking = mode is not False
    most = (
        worst_output_tokens(price, max_tokens, mode, prepared.parameters.get("thinking_budget"))
        if price
        else max_tokens
    )
    lines = [
        f"dry run: {n:,} of {prepared.source.total:,} rows would be sent to {model} ({route}"
        f"{', streamed' if config.effective_stream else ''}); {resumed:,} already answered in "
        f'the journal, {empty:,} not sendable (empty, a missing image, no "json" in JSON mode)',
        f"input tokens: {sum(counts):,} counted with the Qwen tokenizer "
        f"({(sum(counts) / n if n else 0):,.0f} a row on average, {max(counts, default=0):,} at most)"
        + (
            f", plus {images:,} images (not counted: up to {IMAGE_TOKENS_TYPICAL:,} tokens each "
            f"at the default resolution, {IMAGE_TOKENS_MAX:,} at the highest)"
            if images
            else ""
        ),
        f"output tokens: assumed {typical:,} a row "
        + (
            f"(--max-tokens {max_tokens:,})"
            if max_tokens
            else f"(no --max-tokens: a stated default; replies may run to {most:,})"
            if most
            else "(no --max-tokens: a stated default)"
        ),
    ]
    if price is None:
        where = prices.describe() if prices is not None else "no price table for this region"
        lines.append(f"estimated cost: unpriced: {model} has no price in {where} (add it with --prices FILE)")
    else:

        def total(output: int, think: bool) -> Decimal:
            return sum(
                (price.cost(input_tokens=c, output_tokens=output, thinking=think) for c in counts), Decimal(0)
            )

        low = total(0, False)
        expected = total(typical, thinks(model, prepared.parameters) is True)
        high = total(most or typical, thinking)
        lines.append(
            f"estimated cost: ${expected:.4f} (range ${low:.4f} with empty replies "
            f"to ${high:.4f} with every reply at {most or typical:,} tokens"
            f"{', thinking' if thinking and any(t.output_thinking for t in price.tiers) else ''})"
        )
        lines.append(f"prices: {prices.describe()}")  # type: ignore[union-attr]
    seconds = n * 60 / o["rpm"]
    lines.append(
        f"time: at least {duration(seconds)} at --rpm {o['rpm']:g} "
        f"({n:,} requests, {min(config.concurrency, max(n, 1)):,} at a time)"
    )
    print("\n".join(lines))
    return 0


def _journal_read_only(path: Path) -> dict[str, Answers]:
    """A journal's rows without locking or creating anything (for --dry-run)."""
    if not path.exists():
        return {}
    import sqlite3

    found: dict[str, Answers] = {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            for k, h, st, f in db.execute("SELECT key, request_hash, status, final FROM rows"):
                found.setdefault(k, {})[h] = Entry(h, st, bool(f), {})
    except sqlite3.Error:
        return {}
    return found
