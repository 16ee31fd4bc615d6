"""batchgen: run tables of prompts through DashScope (Qwen) chat models.

    >>> import polars as pl, batchgen
    >>> config = batchgen.RunConfig(api_key="sk-...", model="qwen-plus")
    >>> out = batchgen.run_frame(pl.DataFrame({"prompt": ["Hi"]}), config)

Names are imported on first use so that ``batchgen --help`` does not pay for polars.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "batchgen.config",
    "PromptSpec": "batchgen.prompts",
    "run_frame": "batchgen.runner",
    "arun_frame": "batchgen.runner",
    "run": "batchgen.runner",
    "arun": "batchgen.runner",
    "RunResult": "batchgen.results",
    "OUTPUT_COLUMNS": "batchgen.results",
    "read_table": "batchgen.tables",
    "write_table": "batchgen.tables",
    "BatchgenError": "batchgen.errors",
    "UsageError": "batchgen.errors",
    "FatalAPIError": "batchgen.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'batchgen' has no attribute {name!r}")
