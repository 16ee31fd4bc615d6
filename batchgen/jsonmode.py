"""JSON replies: ``--json`` (any JSON object) and ``--json-schema FILE`` (one shape).

DashScope's JSON mode needs the word "json" somewhere in the messages; a row without it would
be refused, so it is that row's error before sending. Whether a reply really is what was asked
for is checked locally and written to ``reply_json_valid``: a reply cut at ``--max-tokens`` is
not valid JSON, and a model without schema support may still drift from the schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from batchgen.errors import RowProblem, UsageError

NO_JSON_WORD = "batchgen.NoJsonWord"
JSON_OBJECT = {"type": "json_object"}

# DashScope takes a json_schema only on some of its commercial models, and never while they
# think; elsewhere JSON mode is sent and the schema is checked here. Other OpenAI-compatible
# servers (vLLM, llama.cpp, Ollama) take schemas whatever the model.
_SCHEMA_MODELS = re.compile(r"^(qwen-plus|qwen-max|qwen-flash|qwen3-max|qwen3\.[5-9])")


def load_schema(path: Path) -> dict[str, Any]:
    """The JSON Schema in ``path``, checked to be a schema before anything is sent."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--json-schema {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"--json-schema {path} is not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise UsageError(
            f"--json-schema {path} must hold a JSON Schema object, e.g. "
            '{"type": "object", "properties": {...}}'
        )
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UsageError(f"--json-schema {path} is not a valid JSON Schema: {exc.message}") from None
    return schema


def schema_supported(model: str, parameters: Mapping[str, Any], dashscope: bool = True) -> bool:
    """Whether to send the schema itself (else JSON mode, and the schema is checked locally)."""
    if not dashscope:
        return True
    return bool(_SCHEMA_MODELS.match(model.lower())) and parameters.get("enable_thinking") is not True


def response_format(
    model: str,
    parameters: Mapping[str, Any],
    *,
    json_mode: bool,
    schema: Mapping[str, Any] | None,
    name: str = "reply",
    dashscope: bool = True,
) -> dict[str, Any] | None:
    """The ``response_format`` to send, or None when replies are free text."""
    if schema is not None and schema_supported(model, parameters, dashscope):
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "reply"
        return {"type": "json_schema", "json_schema": {"name": safe, "schema": dict(schema), "strict": True}}
    if schema is not None or json_mode:
        return dict(JSON_OBJECT)
    return None


def mentions_json(messages: list[dict[str, Any]]) -> bool:
    """Whether any message's text says "json" (any case), as DashScope's JSON mode demands."""
    for message in messages:
        content = message.get("content")
        texts = (
            [content]
            if isinstance(content, str)
            else [p.get("text", "") for p in content or [] if isinstance(p, dict)]
        )
        if any(isinstance(t, str) and "json" in t.lower() for t in texts):
            return True
    return False


def json_word_problem() -> RowProblem:
    return RowProblem(
        NO_JSON_WORD,
        'JSON mode needs the word "json" in the messages '
        "(DashScope refuses the request without it): say it in the "
        "prompt, the template or --system; the row was not sent",
    )


def reply_checker(
    parameters: Mapping[str, Any], schema: Mapping[str, Any] | None
) -> Callable[[str | None], bool] | None:
    """A test of one reply for ``reply_json_valid``; None when the run is not in JSON mode."""
    fmt = parameters.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if schema is None and kind == "json_schema":
        schema = fmt.get("json_schema", {}).get("schema")  # type: ignore[union-attr]
    if schema is None and kind != "json_object":
        return None
    validator = None
    if schema is not None:
        import jsonschema

        validator = jsonschema.validators.validator_for(schema)(schema)

    def check(reply: str | None) -> bool:
        try:
            value = json.loads(reply or "")
        except ValueError:
            return False
        if validator is not None:
            return bool(validator.is_valid(value))
        return isinstance(value, dict)

    return check
