"""Everything checked before a run touches anything: the input, its columns, the parameters,
the settings, the key. ``validate`` stops here; ``run`` and ``--dry-run`` go on from here."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from batchgen.api.models import route_for_model, thinks
from batchgen.budget import Budget
from batchgen.config import (
    MAX_CONCURRENCY,
    RunConfig,
    compatible_url,
    no_key_message,
    parse_param_options,
    unknown_parameters,
)
from batchgen.errors import RowProblem, UsageError
from batchgen.jsonmode import load_schema, mentions_json, response_format
from batchgen.options import RunOptions
from batchgen.pricing import PriceTable, load_prices, region_of
from batchgen.prompts import PromptSpec, build_messages, check_columns
from batchgen.results import check_collisions
from batchgen.tables import Source, format_of, open_source

log = logging.getLogger("batchgen")

# The demo simulator answers like a real endpoint: a little latency, no faults.
SIMULATE_LATENCY = 0.2
SIMULATE_JITTER = 0.1
SIMULATED_BATCH_SPEED = 3600.0  # --simulate --batch: an hour of the batch clock a second
MAX_BATCH_SPEED = 1_000_000.0  # 11 days a second: more only overflows the simulated clock


def batch_speed(options: RunOptions) -> float:
    """How much faster than real time batches run (the simulator's; 1 for a real service)."""
    if not options.server.simulate:
        return 1.0
    return options.batch.batch_speed or SIMULATED_BATCH_SPEED


@dataclass
class Prepared:
    """Everything checked before a run: what ``validate`` reports and ``run`` uses.

    ``config`` is the run's own: the real base URL and key, except under ``--simulate`` (and
    a dry run without a key), whose config names the simulator's demo key until the simulator
    has started and ``for_server`` gives it the simulator's URL.
    """

    options: RunOptions
    source: Source
    spec: PromptSpec
    parameters: dict[str, Any]
    output_format: str
    config: RunConfig = field(repr=False)
    schema: dict[str, Any] | None = field(default=None, repr=False)  # --json-schema, read once

    def for_server(self, base_url: str, key: str) -> RunConfig:
        return replace(self.config, base_url=base_url, api_key=key)


def prepare(options: RunOptions) -> Prepared:
    """Read and check everything a run needs; a ``UsageError`` names the first problem."""
    options = _batch_mode(options)
    _check_engine(options)
    inputs, server = options.input, options.server
    output_format = format_of(options.output.output_path, role="output")
    if inputs.input_path.resolve() == options.output.output_path.resolve():
        raise UsageError(
            f"the output {options.output.output_path} would overwrite the input: choose another name"
        )
    spec = PromptSpec(
        prompt_column=inputs.prompt_column,
        template=inputs.template,
        system=inputs.system_prompt,
        system_column=inputs.system_column,
        messages_column=inputs.messages_column,
        image_columns=tuple(dict.fromkeys(inputs.image_columns)),
        image_root=inputs.input_path.resolve().parent,
    )
    schema_path = options.generation.json_schema
    schema = load_schema(Path(schema_path)) if schema_path else None
    parameters = generation_parameters(options, schema)
    _check_route(options, spec)
    source = _open_input(options, spec)
    _check_server(options)
    # Template errors that only a row can show (a format spec a value cannot take) show now.
    sample = build_messages(spec, source.head(100))
    if server.to_dashscope:  # DashScope's rule; other servers decide for themselves
        _check_json_word(parameters, sample)
    config = _config(options, spec, parameters, schema)
    return Prepared(options, source, spec, parameters, output_format, config, schema)


_WINDOW = re.compile(r"([1-9][0-9]*)([hd])")


def _check_engine(options: RunOptions) -> None:
    """--engine ray's options need it, and it takes neither --batch nor --messages-column yet."""
    pacing = options.pacing
    if pacing.engine != "ray":
        given: dict[str, object] = {"--journal-dir": pacing.journal_dir, "--ray-address": pacing.ray_address}
        given["--ray-actors"] = pacing.ray_actors if pacing.ray_actors != 2 else None
        for flag, value in given.items():
            if value is not None:
                raise UsageError(f"{flag} is for Ray: add --engine ray (or drop {flag})")
        return
    if options.batch.batch:
        raise UsageError("--engine ray and --batch do not go together: the Batch API runs the batch")
    if options.input.messages_column:
        raise UsageError("--engine ray does not take --messages-column yet: build the prompt with --template")


def _batch_mode(options: RunOptions) -> RunOptions:
    """Batch mode's checks; it speaks the OpenAI-compatible API (the Batch API's), whatever --api says."""
    batch, server = options.batch, options.server
    if not batch.batch:
        for flag, given in (("--wait", batch.wait), ("--batch-speed", batch.batch_speed is not None)):
            if given:
                raise UsageError(f"{flag} is for batch mode: add --batch (or drop {flag})")
        return options
    if batch.batch_speed is not None and not server.simulate:
        raise UsageError("--batch-speed sets the simulator's batch clock: use it with --simulate")
    if batch.batch_speed is not None and not 0 < batch.batch_speed <= MAX_BATCH_SPEED:  # NaN too
        raise UsageError(f"--batch-speed {batch.batch_speed!r}: give a number above 0, at most 1,000,000")
    match = _WINDOW.fullmatch(batch.batch_window.strip())
    hours = int(match[1]) * (24 if match[2] == "d" else 1) if match else 0
    if not 24 <= hours <= 336:
        raise UsageError(
            f"--batch-window {batch.batch_window!r} is not a completion window the Batch API takes: "
            "give 24h to 336h, or 1d to 14d"
        )
    if server.endpoint:
        raise UsageError("--endpoint picks a route of the native API; the Batch API has one: drop --endpoint")
    if server.stream:
        raise UsageError("batch lines are never streamed: drop --stream (or --batch)")
    server = replace(server, api="openai")
    if not server.to_dashscope:
        raise UsageError("--batch needs DashScope's Batch API; this base URL is not DashScope: drop --batch")
    return replace(options, server=server)


def _open_input(options: RunOptions, spec: PromptSpec) -> Source:
    inputs = options.input
    separator = inputs.separator
    if separator is not None and format_of(inputs.input_path, inputs.input_format, role="input") != "csv":
        raise UsageError(f"--separator is for CSV input; {inputs.input_path} is not read as CSV: drop it")
    source = open_source(
        inputs.input_path,
        inputs.input_format,
        limit=inputs.limit,
        messages_column=spec.messages_column,
        separator=separator,
    )
    check_columns(spec, source.columns, source.schema)
    check_collisions(source.columns)
    _check_id_column(source, inputs.id_column)
    return source


def _check_server(options: RunOptions) -> None:
    server = options.server
    if options.pacing.concurrency > MAX_CONCURRENCY:
        log.warning(
            "--concurrency %s is more than is useful: batchgen keeps at most %s requests in flight",
            f"{options.pacing.concurrency:,}",
            f"{MAX_CONCURRENCY:,}",
        )
    if server.simulate and server.base_url:
        raise UsageError("--simulate runs against a local simulator; drop --base-url")
    if not server.simulate and not options.policy.dry_run and not server.key:
        raise UsageError(no_key_message(server.api, dashscope=server.to_dashscope))


def generation_parameters(options: RunOptions, schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only what the user set, under DashScope's names; ``--param`` fills in the rest."""
    generation, server = options.generation, options.server
    params = generation.params
    parameters = dict(params) if isinstance(params, Mapping) else parse_param_options(params)
    for key, value in generation.named().items():
        if value is not None:
            if key in parameters:
                raise UsageError(f"{key} is set both by its own option and by --param; keep one")
            parameters[key] = value
    for name in unknown_parameters(parameters):
        log.warning("parameter %s is not one DashScope or the OpenAI API documents: sent as it is", name)
    fmt = response_format(
        server.model,
        parameters,
        json_mode=generation.json,
        schema=schema,
        name=Path(generation.json_schema).stem if generation.json_schema else "reply",
        dashscope=server.to_dashscope,
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
                server.model,
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


def _check_route(options: RunOptions, spec: PromptSpec) -> None:
    """Images go only to the multimodal route; the OpenAI API has one route for all."""
    server = options.server
    if server.api == "openai" and server.endpoint:
        raise UsageError(
            "--endpoint chooses a route of the native API; the OpenAI-compatible "
            "API (--api openai) has one: drop --endpoint"
        )
    if not server.to_dashscope:
        return  # another server: its models are its own business
    route = server.endpoint or route_for_model(server.model)
    if spec.image_columns and route == "text":
        raise UsageError(
            f"{server.model} is a text model and reads no images: pick a "
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


def _config(
    options: RunOptions, spec: PromptSpec, parameters: dict[str, Any], schema: dict[str, Any] | None
) -> RunConfig:
    """The run's config, every setting checked (ranges, NaN, the key's characters) now."""
    server, pacing = options.server, options.pacing
    if server.simulate or (options.policy.dry_run and not server.key):
        from batchgen.simulator import DEMO_KEY

        # The simulator takes its own key; a dry run sends nothing, so it needs none (one that
        # is set is still checked). The simulator's URL comes once it has started.
        base_url, key = "http://127.0.0.1/api/v1", DEMO_KEY
    else:
        base_url, key = server.resolved_base_url(), server.key
    return RunConfig(
        api_key=key,
        base_url=compatible_url(base_url) if server.simulate and server.api == "openai" else base_url,
        model=server.model,
        api=server.api,  # type: ignore[arg-type]  # click's choice
        route=server.endpoint,  # type: ignore[arg-type]
        stream=server.stream,
        json_schema=schema,
        dashscope=server.to_dashscope,
        workspace=(server.workspace or None) if server.to_dashscope else None,
        parameters=parameters,
        concurrency=min(pacing.concurrency, MAX_CONCURRENCY),
        rpm=pacing.rpm,
        tpm=pacing.tpm,
        adaptive=not pacing.fixed_rate,
        rate_store=pacing.rate_store or None,
        rate_key=pacing.rate_key,
        max_attempts=pacing.max_attempts,
        timeout=pacing.timeout,
    )


@contextlib.contextmanager
def server_for_run(prepared: Prepared) -> Iterator[RunConfig]:
    """The run's config: as prepared, or pointed at a simulator started for this run."""
    if not prepared.options.server.simulate:
        yield prepared.config
        return
    from batchgen.simulator import SimulatorConfig, SimulatorThread

    # The simulator gets its own demo key: a real key never leaves for a local test server.
    speed = batch_speed(prepared.options)
    sim_config = SimulatorConfig(latency=SIMULATE_LATENCY, jitter=SIMULATE_JITTER, batch_speed=speed)
    with SimulatorThread(sim_config) as simulator:
        url = simulator.base_url
        api = prepared.options.server.api
        yield prepared.for_server(compatible_url(url) if api == "openai" else url, sim_config.key)


def price_region(options: RunOptions) -> str:
    """The region whose prices apply: the simulator bills like the default (intl)."""
    server = options.server
    if server.simulate:
        return "intl"
    return server.region or region_of(server.resolved_base_url())


def prices_for(options: RunOptions) -> PriceTable:
    """The price table for the run's region (empty for a region it has no prices for: unpriced rows)."""
    return load_prices(options.policy.prices_path, region=price_region(options))


def budget_for(
    options: RunOptions, prices: PriceTable | None, parameters: Mapping[str, Any]
) -> Budget | None:
    """``--max-cost``'s guard, or None without it."""
    max_cost = options.policy.max_cost
    if max_cost is None:
        return None
    if not math.isfinite(max_cost):
        raise UsageError(f"--max-cost must be a number of US dollars, got {max_cost}")
    model = options.server.model
    price = prices.lookup(model) if prices is not None else None
    if prices is None or price is None:
        where = prices.describe() if prices is not None else "the price table"
        raise UsageError(
            f"--max-cost needs the price of {model}, which {where} does not have: add it with --prices FILE"
        )
    return Budget(
        Decimal(str(max_cost)),
        price,
        prices,
        max_tokens=parameters.get("max_tokens"),
        thinking=thinks(model, parameters),
        thinking_budget=parameters.get("thinking_budget"),
    )
