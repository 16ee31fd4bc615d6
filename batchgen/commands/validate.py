"""``batchgen validate``: every check ``run`` makes before sending, and nothing more."""

from __future__ import annotations

import logging
from dataclasses import replace

from batchgen.commands.outputs import check_output_folder
from batchgen.commands.prepare import budget_for, prepare, prices_for
from batchgen.config import COMPATIBLE_PREFIX, NATIVE_PREFIX, unknown_parameters
from batchgen.journal import check_unlocked
from batchgen.logs import event
from batchgen.options import RunOptions

log = logging.getLogger("batchgen")


def validate_command(options: RunOptions) -> int:
    prepared = prepare(options)
    config = prepared.config
    if options.server.simulate:
        prefix = COMPATIBLE_PREFIX if config.api == "openai" else NATIVE_PREFIX
        config = replace(config, base_url="http://127.0.0.1:<free port>" + prefix)
    stream = " streamed" if config.effective_stream else ""
    budget_for(options, prices_for(options), prepared.parameters)
    output = options.output.output_path
    check_output_folder(output)
    check_unlocked(output)  # exit 4, as run would
    unknown = unknown_parameters(prepared.parameters)
    sendable = prepared.source.total
    log.info(
        "ok: %s rows of %s (columns: %s) would go%s to %s on %s; output %s%s",
        f"{sendable:,}",
        options.input.input_path,
        ", ".join(prepared.source.columns),
        stream,
        config.model,
        config.url,
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
