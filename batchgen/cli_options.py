"""The options of ``batchgen run`` and ``validate`` as click decorator stacks, one per group of
``options.RunOptions`` (the typed values the commands take), in the order ``--help`` shows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

INPUT_FORMATS = ("csv", "parquet", "jsonl")


def _stack(*decorators: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Apply click decorators so that they show in ``--help`` in the order given."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def _input_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """INPUT and how each row becomes messages: ``options.InputOptions``."""
    return _stack(
        click.argument(
            "input_path", metavar="INPUT", required=False, type=click.Path(dir_okay=False, path_type=Path)
        ),
        click.option(
            "--input-format",
            type=click.Choice(INPUT_FORMATS),
            help="Read INPUT as this format whatever its extension.",
        ),
        click.option(
            "--separator",
            metavar="CHAR",
            help="Field separator of a CSV input, e.g. ';' or '\\t' for tab.  [default: ,]",
        ),
        click.option("--prompt-column", help="Column holding the user prompt.  [default: prompt]"),
        click.option("--template", help="Build the prompt from columns, e.g. 'Summarize: {text}'."),
        click.option("--system", "system_prompt", help="System prompt for every row."),
        click.option("--system-column", help="Column holding each row's system prompt."),
        click.option(
            "--messages-column", help='Column holding a JSON array of {"role", "content"} messages.'
        ),
        click.option("--id-column", help="Column with a unique, stable row key.  [default: row number]"),
        click.option("--limit", type=click.IntRange(min=1), help="Run only the first N rows."),
        click.option(
            "--image-column",
            "image_columns",
            multiple=True,
            metavar="COL",
            help="Column of image URLs or file paths (or lists of them) sent with each "
            "row's prompt (repeatable); needs a vision model.",
        ),
    )(command)


def _output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where the answers and the reports go: ``options.OutputOptions``."""
    return _stack(
        click.option(
            "-o",
            "--output",
            "output_path",
            type=click.Path(path_type=Path),
            help="Output table; .csv, .parquet or .jsonl picks the format.  [required]",
        ),
        click.option(
            "--summary",
            "summary_path",
            type=click.Path(path_type=Path),
            help="Write a JSON summary of the run to this file.",
        ),
        click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="Log lines on stderr for people or as JSON objects.",
        ),
        click.option(
            "-q", "--quiet", is_flag=True, help="No progress and no summary line; errors still print."
        ),
    )(command)


def _server_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Whom to ask: ``options.ServerOptions``."""
    return _stack(
        click.option("-m", "--model", default="qwen-plus", show_default=True, help="Model name."),
        click.option(
            "--api",
            type=click.Choice(["dashscope", "openai"]),
            default="dashscope",
            show_default=True,
            help="DashScope's native API, or the OpenAI-compatible one (DashScope's "
            "compatible mode, vLLM, Ollama, llama.cpp server).",
        ),
        click.option(
            "--endpoint",
            type=click.Choice(["text", "multimodal"]),
            help="Force the native API route.  [default: chosen from the model]",
        ),
        click.option(
            "--stream/--no-stream",
            default=None,
            help="Send streamed (SSE) requests, or never.  [default: for models and "
            "modes that require it, and for thinking]",
        ),
        click.option(
            "--base-url",
            help="API base URL.  [env: DASHSCOPE_HTTP_BASE_URL; with --api openai first OPENAI_BASE_URL]",
        ),
        click.option(
            "--region",
            type=click.Choice(["intl", "us", "cn", "hk"]),
            help="Region of the public endpoint.  [env: DASHSCOPE_API_REGION; default: intl]",
        ),
        click.option(
            "--workspace",
            envvar="DASHSCOPE_WORKSPACE_ID",
            show_envvar=True,
            help="Workspace ID, sent as X-DashScope-WorkSpace.",
        ),
        click.option(
            "--simulate",
            is_flag=True,
            help="Run against the built-in simulator on a local port (no key needed).",
        ),
    )(command)


def _generation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """What each request asks of the model: ``options.GenerationOptions``."""
    return _stack(
        click.option("--temperature", type=float, help="Sampling temperature, [0, 2)."),
        click.option("--top-p", type=float, help="Nucleus sampling mass, (0, 1]."),
        click.option("--top-k", type=int, help="Sample from the k most likely tokens."),
        click.option("--max-tokens", type=int, help="Cap on output tokens per reply."),
        click.option("--seed", type=int, help="Random seed, [0, 2^31-1]."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option(
            "--enable-thinking/--disable-thinking",
            default=None,
            help="Turn thinking on or off on hybrid models.  [default: send nothing]",
        ),
        click.option("--thinking-budget", type=int, help="Cap on reasoning tokens."),
        click.option(
            "--json",
            "json",
            is_flag=True,
            help='Ask for JSON object replies (the prompt must say "json"); fills reply_json_valid.',
        ),
        click.option(
            "--json-schema",
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help="Ask for replies matching this JSON Schema; fills reply_json_valid.",
        ),
        click.option(
            "--param",
            "params",
            multiple=True,
            metavar="KEY=JSON",
            help="Any other parameter, e.g. --param presence_penalty=0.5 (repeatable).",
        ),
    )(command)


def _pacing_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """How fast, how many at once, how patiently: ``options.PacingOptions``."""
    return _stack(
        click.option(
            "-c",
            "--concurrency",
            type=click.IntRange(min=1),
            default=16,
            show_default=True,
            help="Requests in flight at once.",
        ),
        click.option(
            "--rpm",
            type=click.FloatRange(min=0, min_open=True),
            default=600.0,
            show_default=True,
            help="Requests per minute, paced evenly (RPM/60 a second).",
        ),
        click.option(
            "--tpm",
            type=click.FloatRange(min=0, min_open=True),
            help="Tokens per minute (input + output), paced per second.  [default: no token pacing]",
        ),
        click.option(
            "--fixed-rate",
            is_flag=True,
            help="Hold --rpm/--tpm exactly: no ramp-up, no slowing down on 429s.",
        ),
        click.option(
            "--rate-store",
            metavar="URL",
            help="Share one --rpm/--tpm budget with every run using this Redis, e.g. "
            "redis://127.0.0.1:6379/0.  [default: this run's own budget]",
        ),
        click.option(
            "--rate-key",
            metavar="NAME",
            help="The shared budget's name in --rate-store.  [default: one per service, account and model]",
        ),
        click.option(
            "--max-attempts",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Attempts per row, first one included.",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=300.0,
            show_default=True,
            help="Seconds to wait for one answer.",
        ),
    )(command)


def _engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where the rows are answered: this process, or Ray actors (part of ``options.PacingOptions``)."""
    return _stack(
        click.option(
            "--engine",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="Answer in this process, or on Ray actors (pip install 'batchgen[ray]').",
        ),
        click.option(
            "--journal-dir",
            metavar="DIR",
            help="With --engine ray: the actors' journals, on storage every node reaches.  "
            "[default: OUTPUT.ray-journals beside the output]",
        ),
        click.option(
            "--ray-address",
            metavar="ADDRESS",
            help="With --engine ray: the cluster to join (auto, or ray://HOST:10001).  "
            "[default: start Ray on this machine]",
        ),
        click.option(
            "--ray-actors",
            type=click.IntRange(min=1),
            default=2,
            show_default=True,
            help="With --engine ray: actors, each keeping --concurrency requests in flight.",
        ),
    )(command)


def _policy_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """What the run may do (resume, spend, stop): ``options.PolicyOptions``."""
    return _stack(
        click.option(
            "--grace",
            type=click.FloatRange(min=0),
            default=30.0,
            show_default=True,
            help="On Ctrl-C or SIGTERM, seconds to let requests in flight finish.",
        ),
        click.option(
            "--retry-errors",
            is_flag=True,
            help="On resume, send rows that failed permanently last time again too.",
        ),
        click.option("--fresh", is_flag=True, help="Ignore and replace the journal: answer every row again."),
        click.option(
            "--dry-run", is_flag=True, help="Count tokens and estimate cost and time; send and write nothing."
        ),
        click.option(
            "--max-cost",
            type=click.FloatRange(min=0, min_open=True),
            metavar="USD",
            help="Stop sending before this run could spend more than USD (exit 5).",
        ),
        click.option(
            "--prices",
            "prices_path",
            type=click.Path(dir_okay=False),
            help="A price file merged over the built-in table.  [env: BATCHGEN_PRICES]",
        ),
    )(command)


def _batch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Batch mode: ``options.BatchOptions``."""
    return _stack(
        click.option(
            "--batch",
            is_flag=True,
            help="Answer through the Batch API at half price; rerun to collect (exit 6: still running).",
        ),
        click.option("--wait", is_flag=True, help="With --batch: poll until every batch has ended."),
        click.option(
            "--batch-window",
            default="24h",
            show_default=True,
            metavar="WINDOW",
            help="With --batch: the completion window, 24h to 336h (or 1d to 14d).",
        ),
        click.option(
            "--batch-fallback",
            type=click.Choice(["batch", "online", "none"]),
            default="batch",
            show_default=True,
            help="Rows a batch ended without running: a new batch next run, online now, or errors.",
        ),
        click.option(
            "--batch-speed",
            type=click.FloatRange(min=0, min_open=True),
            metavar="X",
            help="With --simulate: the simulated batch clock runs X times real time.  [default: 3600]",
        ),
    )(command)


_job_option = click.option(
    "--job",
    "job_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A job file (TOML) describing the run; options given here override it.",
)


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``run`` and ``validate`` share, group by group (``options.RunOptions``)."""
    return _stack(
        _output_options,
        _job_option,
        _input_options,
        _server_options,
        _generation_options,
        _pacing_options,
        _engine_options,
        _policy_options,
        _batch_options,
    )(command)
