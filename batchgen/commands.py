"""What each CLI command does, as plain functions of already-parsed options (no click here)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from batchgen.config import ENV_API_KEY, RunConfig, parse_param_options, resolve_base_url
from batchgen.errors import UsageError
from batchgen.progress import Progress, summary_line
from batchgen.prompts import PromptSpec, check_columns
from batchgen.runner import arun, check_collisions, exit_code
from batchgen.tables import check_writable, format_of, read_table, write_table

# The demo simulator answers like a real endpoint: a little latency, no faults.
SIMULATE_LATENCY = 0.2
SIMULATE_JITTER = 0.1


def _generation_parameters(options: dict[str, Any]) -> dict[str, Any]:
    """Only what the user set, under DashScope's names; ``--param`` fills in the rest."""
    parameters = parse_param_options(options["params"])
    named = {
        "temperature": options["temperature"], "top_p": options["top_p"],
        "top_k": options["top_k"], "max_tokens": options["max_tokens"], "seed": options["seed"],
        "stop": list(options["stop"]) or None, "enable_thinking": options["enable_thinking"],
        "thinking_budget": options["thinking_budget"],
    }
    for key, value in named.items():
        if value is not None:
            if key in parameters:
                raise UsageError(f"{key} is set both by its own option and by --param; keep one")
            parameters[key] = value
    return parameters


def _check_id_column(frame: pl.DataFrame, column: str | None) -> None:
    if column is None:
        return
    if column not in frame.columns:
        raise UsageError(f"--id-column {column!r} is not in the input; its columns are: "
                         f"{', '.join(frame.columns)}")
    ids = frame.get_column(column)
    if ids.null_count():
        raise UsageError(f"--id-column {column!r} has {ids.null_count()} empty value(s): "
                         "every row needs a key")
    duplicated = ids.filter(ids.is_duplicated())
    if duplicated.len():
        raise UsageError(f"--id-column {column!r} is not unique (e.g. {duplicated[0]!r} appears "
                         f"{int((ids == duplicated[0]).sum())} times): pick a unique key column")


@contextlib.contextmanager
def _endpoint(simulate: bool, base_url: str | None, region: str | None) -> Iterator[tuple[str, str]]:
    """The base URL and key to use: the user's, or a simulator started for this run."""
    if not simulate:
        yield resolve_base_url(base_url, region), os.environ.get(ENV_API_KEY, "")
        return
    if base_url:
        raise UsageError("--simulate runs against a local simulator; drop --base-url")
    from batchgen.simulator import SimulatorConfig, SimulatorThread

    # The simulator gets its own demo key: a real key never leaves for a local test server.
    sim_config = SimulatorConfig(latency=SIMULATE_LATENCY, jitter=SIMULATE_JITTER)
    with SimulatorThread(sim_config) as simulator:
        yield simulator.base_url, sim_config.key


def run_command(*, input_path: Path, output_path: Path, input_format: str | None,
                prompt_column: str | None, template: str | None, system_prompt: str | None,
                system_column: str | None, messages_column: str | None, id_column: str | None,
                limit: int | None, model: str, endpoint: str | None, base_url: str | None,
                region: str | None, workspace: str | None, concurrency: int, rpm: float,
                max_attempts: int, timeout: float, simulate: bool, quiet: bool,
                **generation: Any) -> int:
    """``batchgen run``: check everything, answer every row, write the output; return the exit code."""
    output_format = format_of(output_path, role="output")
    if input_path.resolve() == output_path.resolve():
        raise UsageError(f"the output {output_path} would overwrite the input: choose another name")
    spec = PromptSpec(prompt_column=prompt_column, template=template, system=system_prompt,
                      system_column=system_column, messages_column=messages_column)
    parameters = _generation_parameters(generation)
    frame = read_table(input_path, input_format)
    if limit is not None:
        frame = frame.head(limit)
    check_columns(spec, frame.columns)
    check_collisions(frame.columns)
    _check_id_column(frame, id_column)
    if not simulate and not os.environ.get(ENV_API_KEY, "").strip():
        from batchgen.config import NO_KEY

        raise UsageError(NO_KEY)

    with _endpoint(simulate, base_url, region) as (url, key):
        config = RunConfig(api_key=key, base_url=url, model=model, route=endpoint,  # type: ignore[arg-type]
                           workspace=workspace or None, parameters=parameters,
                           concurrency=concurrency, rpm=rpm, max_attempts=max_attempts,
                           timeout=timeout)
        check_writable(output_path)
        progress = None if quiet else Progress(sys.stderr)
        result = asyncio.run(arun(frame, config, spec, progress=progress))

    target = output_path
    if result.fatal is not None and output_path.exists():
        # An aborted run's table is mostly "skipped": never let it replace earlier answers.
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = output_path.with_name(f"{output_path.stem}.aborted-{stamp}{output_path.suffix}")
    write_table(result.frame, target, output_format)
    if result.fatal is not None:
        print(f"batchgen: error: {result.fatal}", file=sys.stderr)
        if target != output_path:
            print(f"batchgen: kept the existing {output_path}; this run's table is {target}",
                  file=sys.stderr)
    if not quiet:
        print(f"batchgen: {summary_line(result.stats)} · wrote {target}", file=sys.stderr)
    return exit_code(result)
