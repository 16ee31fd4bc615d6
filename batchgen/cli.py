"""The ``batchgen`` command line: parses options, calls the library, maps errors to exit codes.

Heavy modules (polars, httpx, aiohttp) are imported inside the commands so that
``batchgen --help`` starts at once.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from batchgen import __version__
from batchgen.cli_options import run_options
from batchgen.errors import BatchgenError, ExitCode, UsageError


def _kind(param: click.Parameter) -> str:
    """What a job file must give for ``param``: see ``jobs.check_value``."""
    if param.name == "params":
        return "table"
    if param.multiple:
        return "strs"
    if isinstance(param, click.Option) and (param.is_flag or param.is_bool_flag):
        return "bool"
    if isinstance(param.type, click.types.IntParamType):
        return "int"
    if isinstance(param.type, click.types.FloatParamType):
        return "float"
    return "str"


def _merge_job(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """Command line over job file over environment and defaults; then fill path placeholders."""
    from batchgen.jobs import PATH_KEYS, fill_placeholders, job_options

    job_path = options["job_path"]
    merged = dict(options)
    if job_path is not None:
        params = {p.name: p for p in ctx.command.params if p.name}
        from_job = job_options(job_path, {name: _kind(p) for name, p in params.items()})
        for name, value in from_job.items():
            if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
                if name == "params":  # --param KEY=... on the command line wins key by key
                    merged[name] = {**value, **dict(_split_params(options[name]))}
                continue
            if name == "params":  # a named flag on the command line (--max-tokens) wins too
                value = {
                    k: v
                    for k, v in value.items()
                    if k not in params or ctx.get_parameter_source(k) is not ParameterSource.COMMANDLINE
                }
            param = params[name]
            try:
                merged[name] = (
                    value if name == "params" or _kind(param) == "bool" else param.type_cast_value(ctx, value)
                )
            except click.BadParameter as exc:
                raise UsageError(f"{job_path}: {name!r}: {exc.message}") from None
    if merged["input_path"] is None:
        raise UsageError("give the INPUT table (or a --job file that names it)")
    if merged["output_path"] is None:
        raise UsageError("give -o/--output (or a --job file that names it)")
    job = job_path.stem if job_path is not None else None
    for key in PATH_KEYS:
        if merged.get(key) is not None:
            merged[key] = Path(fill_placeholders(str(merged[key]), job=job))
    merged["job"] = job
    del merged["job_path"]
    return merged


def _split_params(pairs: Any) -> list[tuple[str, str]]:
    from batchgen.config import parse_param_options

    return list(parse_param_options(pairs).items())


def _dispatch(ctx: click.Context, command: str, options: dict[str, Any]) -> None:
    """Merge the job file, set up logging, run ``command`` on the typed options, exit with its code."""
    from batchgen.logs import setup_logging
    from batchgen.options import RunOptions

    log = setup_logging(options["log_format"], quiet=options["quiet"])
    try:
        merged = _merge_job(ctx, options)
        if merged["log_format"] != options["log_format"] or merged["quiet"] != options["quiet"]:
            log = setup_logging(merged["log_format"], quiet=merged["quiet"])
        typed = RunOptions.from_values(merged)
        if command == "run":
            from batchgen.commands.run import run_command

            code = run_command(typed)
        else:
            from batchgen.commands.validate import validate_command

            code = validate_command(typed)
    except BatchgenError as err:
        log.error("%s", err)
        sys.exit(err.exit_code)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchgen")
def cli() -> None:
    """Run tables of prompts through DashScope (Qwen) chat models.

    \b
    Try it with no key against the built-in simulator:
      batchgen run sample_data/prompts.csv -o out/answers.csv --simulate
    """


@cli.command()
@run_options
@click.pass_context
def run(ctx: click.Context, **options: Any) -> None:
    """Answer every row of INPUT and write the table with the answers to OUTPUT.

    Every finished row is journalled beside OUTPUT (OUTPUT.journal): run the same command
    again after a crash or Ctrl-C and only the rows not yet answered are sent.

    \b
    Examples:
      batchgen run prompts.csv -o answers.parquet -m qwen-plus
      batchgen run reviews.parquet -o out.csv --template 'Sentiment of: {review}'
      batchgen run --job jobs/nightly-summaries.toml
      batchgen run sample_data/prompts.csv -o out/answers.csv --simulate
      batchgen run prompts.csv -o answers.csv --batch   # half price; rerun to collect

    \b
    Exit codes: 0 every row ok, 3 some rows failed, 1 stopped on a fatal error,
    2 bad usage or input (nothing sent), 4 another run holds OUTPUT, 5 stopped by
    --max-cost, 6 batches still running (--batch: run again later), 130/143 stopped
    by SIGINT/SIGTERM (after 5, 6, 130 and 143 run the same command again to resume).
    """
    _dispatch(ctx, "run", options)


@cli.command()
@run_options
@click.pass_context
def validate(ctx: click.Context, **options: Any) -> None:
    """Check a run without sending anything: input, columns, template, parameters, key.

    \b
    Examples:
      batchgen validate prompts.csv -o answers.csv --template 'Summarize: {text}'
      batchgen validate --job jobs/nightly-summaries.toml

    Exit code 0 when the run would start, 2 (with the reason) when it would not, 4 when
    another run holds OUTPUT.
    """
    _dispatch(ctx, "validate", options)


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option(
    "--by",
    default="model",
    show_default=True,
    metavar="KEYS",
    help="Group by these, comma-separated: model, day, status, finish_reason, job, billing_mode.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "markdown"]),
    default="table",
    show_default=True,
    help="Report format.",
)
@click.option(
    "--prices",
    "prices_path",
    type=click.Path(dir_okay=False),
    help="A price file merged over the built-in table.  [env: BATCHGEN_PRICES]",
)
@click.option(
    "--region",
    type=click.Choice(["intl", "us", "cn", "hk"]),
    help="Price region.  [default: the one the run recorded, else intl]",
)
def cost(files: tuple[str, ...], by: str, fmt: str, prices_path: str | None, region: str | None) -> None:
    """Report tokens and cost of batchgen output files (CSV, Parquet, JSONL; globs work).

    \b
    Examples:
      batchgen cost out/answers.csv
      batchgen cost 'out/*.parquet' --by day,model --format markdown
      batchgen cost out/run.jsonl --format json > cost.json
    """
    from batchgen.commands.cost import cost_command
    from batchgen.logs import setup_logging

    log = setup_logging("text")
    try:
        cost_command(files=list(files), by=by, fmt=fmt, prices_path=prices_path, region=region)
    except BatchgenError as err:
        log.error("%s", err)
        sys.exit(err.exit_code)


@cli.group()
def batch() -> None:
    """The Batch API batches of an output (batch mode: batchgen run --batch).

    \b
    Examples:
      batchgen batch list answers.csv      # what the journal holds, no network
      batchgen batch status answers.csv    # each batch not yet collected, asked of the service
      batchgen batch cancel answers.csv    # cancel them; the next run collects what they finished
    """


_output_argument = click.argument("output", metavar="OUTPUT", type=click.Path(dir_okay=False, path_type=Path))


def _service_options(command: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--base-url",
                help="OpenAI-compatible base URL.  [default: the one each batch was submitted to]",
            ),
            click.option(
                "--region",
                type=click.Choice(["intl", "us", "cn", "hk"]),
                help="DashScope region, instead of the URL each batch was submitted to.",
            ),
            click.option(
                "--workspace",
                envvar="DASHSCOPE_WORKSPACE_ID",
                help="X-DashScope-WorkSpace.  [default: the one each batch was submitted with]",
            ),
        ]
    ):
        command = option(command)
    return command


def _batch_command(work: Any) -> None:
    from batchgen.logs import setup_logging

    log = setup_logging("text")
    try:
        sys.exit(work())
    except BatchgenError as err:
        log.error("%s", err)
        sys.exit(err.exit_code)


@batch.command("list")
@_output_argument
def batch_list(output: Path) -> None:
    """The batches OUTPUT's journal holds: batch id, state, last status, rows, name (no key)."""
    from batchgen.commands import batch as commands

    _batch_command(lambda: commands.batch_list(output))


@batch.command("status")
@_output_argument
@_service_options
def batch_status(output: Path, base_url: str | None, region: str | None, workspace: str | None) -> None:
    """Ask the service about each batch of OUTPUT not yet collected."""
    from batchgen.commands import batch as commands

    target = commands.BatchTarget(output, base_url, region, workspace)
    _batch_command(lambda: commands.batch_status(target))


@batch.command("cancel")
@_output_argument
@_service_options
def batch_cancel(output: Path, base_url: str | None, region: str | None, workspace: str | None) -> None:
    """Cancel OUTPUT's running batches; rerun batchgen run to collect what they finished."""
    from batchgen.commands import batch as commands

    target = commands.BatchTarget(output, base_url, region, workspace)
    _batch_command(lambda: commands.batch_cancel(target))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option(
    "--key",
    envvar="DASHSCOPE_API_KEY",
    help="The one API key accepted.  [default: $DASHSCOPE_API_KEY, else a demo key]",
)
@click.option(
    "--latency", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Mean seconds per answer."
)
@click.option(
    "--jitter",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Latency varies uniformly by this many seconds either way.",
)
@click.option(
    "--rpm",
    type=click.IntRange(min=1),
    help="Request quota per minute, enforced per second (429 Throttling.RateQuota past it).",
)
@click.option(
    "--tpm",
    type=click.IntRange(min=1),
    help="Token quota per minute (input + output), "
    "enforced per second (429 Throttling.AllocationQuota past it).",
)
@click.option("--fault-429", type=click.FloatRange(0, 1), default=0.0, help="Share of 429s.")
@click.option("--fault-500", type=click.FloatRange(0, 1), default=0.0, help="Share of 500s.")
@click.option(
    "--fault-drop",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of connections dropped with no answer.",
)
@click.option(
    "--fault-truncate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of 200 answers cut off mid-body.",
)
@click.option(
    "--fault-hang",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of requests that hang for --hang-seconds.",
)
@click.option("--hang-seconds", type=click.FloatRange(min=0), default=600.0, show_default=True)
@click.option(
    "--fault-200-error",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of HTTP 200 answers carrying an error code.",
)
@click.option("--seed", type=int, help="Seed for faults and latency, for repeatable runs.")
@click.option(
    "--batch-speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Batch API: simulated seconds per real second (3600 runs an hour of a batch in a second).",
)
@click.option(
    "--batch-validation-seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Batch API: simulated seconds a batch spends validating.",
)
@click.option(
    "--batch-queue-seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Batch API: simulated seconds in progress before the first line runs (counts stand still).",
)
@click.option(
    "--batch-lines-per-second",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Batch API: lines run per simulated second.",
)
@click.option(
    "--batch-finalizing-seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Batch API: simulated seconds finalizing, or cancelling after a cancel.",
)
@click.option(
    "--batch-fault-429",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Batch API: share of file and batch calls answered 429.",
)
@click.option(
    "--batch-fault-lost-create",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Batch API: share of batch creates that create the batch but drop the answer.",
)
@click.option(
    "--batch-fault-create-500",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Batch API: share of batch creates answered 500 without making a batch.",
)
@click.option(
    "--batch-fault-line-500",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Batch API: share of batch lines that fail with a 500.",
)
@click.option(
    "--batch-hang-after",
    multiple=True,
    metavar="KIND",
    help="Batch API: this call (upload, create, ...) takes effect, then hangs --hang-seconds.",
)
def simulate(host: str, port: int, key: str | None, **knobs: Any) -> None:
    """Serve a DashScope simulator for tests, demos and benchmarks.

    \b
    Speaks the native text and multimodal routes and the OpenAI-compatible one
    (/compatible-mode/v1) with DashScope's shapes, errors and quotas:
      batchgen simulate --port 8765 --latency 0.5 --rpm 600 --fault-429 0.05
      DASHSCOPE_HTTP_BASE_URL=http://127.0.0.1:8765/api/v1 batchgen run in.csv -o out.csv
    """
    from batchgen.simulator import DEMO_KEY, SimulatorConfig, serve_forever

    if sum(v for k, v in knobs.items() if k.startswith("fault_")) > 1:
        raise click.BadParameter("the --fault-* shares add up to more than 1")
    try:
        config = SimulatorConfig(key=key or DEMO_KEY, **knobs)
    except ValueError as exc:  # a NaN or an infinity the option types let through
        raise click.UsageError(str(exc)) from None
    try:
        serve_forever(config, host=host, port=port)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
            "pick another --port, or 0 for any free one"
        ) from None


def _collect_less() -> None:
    """Tune the garbage collector for ``batchgen run``, a process that allocates and frees a few
    objects per request at thousands of requests a second.

    Start-up's objects (the modules, polars, aiohttp: most of what the process ever holds) are
    frozen out of the collector's scans, and the youngest generation is collected every 20,000
    allocations rather than 700: about 5 % less CPU and 0.15 s less wall time at 8,000 requests
    (``bench/bench_cpu.py``). Only the console script does this, never a library caller's process.
    """
    import batchgen.commands.run  # noqa: F401  (its imports are what start-up allocates)

    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def main() -> None:
    """The console script: click's handling, except that Ctrl-C exits 130 as documented."""
    if sys.argv[1:2] == ["run"]:
        _collect_less()
    try:
        code = cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("batchgen: interrupted", err=True)
        sys.exit(ExitCode.SIGINT)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
