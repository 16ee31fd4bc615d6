"""The options of ``run`` and ``validate`` as typed groups, built once at the CLI's edge.

Each group matches one decorator stack in ``cli.py`` (``_input_options``, ``_server_options``,
...), and each command takes ``RunOptions`` (or the groups it needs): no command looks an
option up by name. Values are as merged by the CLI: command line over job file over
environment and defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from batchgen.config import api_key_from_env, dashscope_endpoint, resolve_base_url


@dataclass(frozen=True)
class InputOptions:
    """What to read and how each row becomes messages."""

    input_path: Path
    input_format: str | None = None
    separator: str | None = None
    prompt_column: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    system_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None
    limit: int | None = None
    image_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerOptions:
    """Whom to ask: the model, the wire format, the route and where the server is."""

    model: str = "qwen-plus"
    api: str = "dashscope"
    endpoint: str | None = None  # --endpoint: the native API's route (text, multimodal)
    stream: bool | None = None
    base_url: str | None = None
    region: str | None = None
    workspace: str | None = None
    simulate: bool = False

    @cached_property
    def to_dashscope(self) -> bool:
        """Requests go to DashScope (or its simulator): its key, workspace and rules apply."""
        return self.simulate or dashscope_endpoint(self.base_url, self.api)

    @cached_property
    def key(self) -> str:
        """The API key from the environment for this server ("" when none is set)."""
        return api_key_from_env(self.api, dashscope=self.to_dashscope)

    def resolved_base_url(self) -> str:
        """``--base-url``, else the environment, else the region's (not the simulator's)."""
        return resolve_base_url(self.base_url, self.region, api=self.api)

    @property
    def answered_by(self) -> str:
        """Whom the run asks, as the journal and the output record it."""
        return "simulator" if self.simulate else self.resolved_base_url().rstrip("/")


@dataclass(frozen=True)
class GenerationOptions:
    """What each request asks of the model."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    json: bool = False
    json_schema: str | None = None
    params: Mapping[str, Any] | tuple[str, ...] = ()  # --param pairs, or a job's [parameters]

    def named(self) -> dict[str, Any]:
        """The parameters set by their own option, under DashScope's names."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop) or None,
            "enable_thinking": self.enable_thinking,
            "thinking_budget": self.thinking_budget,
        }


@dataclass(frozen=True)
class PacingOptions:
    """How fast, how many at once, how patiently."""

    concurrency: int = 16
    rpm: float = 600.0
    tpm: float | None = None
    fixed_rate: bool = False
    rate_store: str | None = None
    rate_key: str | None = None
    engine: str = "local"
    journal_dir: str | None = None
    ray_address: str | None = None
    ray_actors: int = 2
    max_attempts: int = 8
    timeout: float = 300.0


@dataclass(frozen=True)
class PolicyOptions:
    """What the run may do: resume, spend, stop."""

    grace: float = 30.0
    retry_errors: bool = False
    fresh: bool = False
    dry_run: bool = False
    max_cost: float | None = None
    prices_path: str | None = None


@dataclass(frozen=True)
class BatchOptions:
    """Batch mode: through the Batch API at half price, results within a window."""

    batch: bool = False
    wait: bool = False
    batch_window: str = "24h"
    batch_fallback: str = "batch"
    batch_speed: float | None = None  # --simulate only: the simulated batch clock's speed


@dataclass(frozen=True)
class OutputOptions:
    """Where the answers and the reports go."""

    output_path: Path
    summary_path: Path | None = None
    log_format: str = "text"
    quiet: bool = False
    job: str | None = None  # the job file's name, when the run came from one


@dataclass(frozen=True)
class RunOptions:
    input: InputOptions
    server: ServerOptions
    generation: GenerationOptions
    pacing: PacingOptions
    policy: PolicyOptions
    output: OutputOptions
    batch: BatchOptions = BatchOptions()

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunOptions:
        """The groups from the merged option values; every value must find its group."""
        groups = {}
        left = dict(values)
        for f in fields(cls):
            group = _GROUPS[f.name]
            names = [g.name for g in fields(group)]
            taken = {name: left.pop(name) for name in names if name in left}
            for name in ("image_columns", "stop"):
                if isinstance(taken.get(name), list | tuple):
                    taken[name] = tuple(taken[name])
            groups[f.name] = group(**taken)
        if left:
            raise TypeError(f"options without a group: {', '.join(sorted(left))}")
        return cls(**groups)


_GROUPS: dict[str, type] = {
    "input": InputOptions,
    "server": ServerOptions,
    "generation": GenerationOptions,
    "pacing": PacingOptions,
    "policy": PolicyOptions,
    "output": OutputOptions,
    "batch": BatchOptions,
}
