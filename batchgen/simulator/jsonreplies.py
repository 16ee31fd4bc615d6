"""JSON-mode replies: the JSON schemas the simulator can answer, and documents valid against them."""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard

from batchgen.simulator.text import _prose, _word_indices


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SCHEMA_DEPTH = 32


def _schema_problem(schema: Any, where: str, depth: int = 0) -> str | None:
    """Why ``schema`` is not a JSON schema the simulator can answer, or None.

    Only the keywords the simulator reads are checked; the others are ignored, as is the
    ``strict`` flag, and the reply is valid whatever they say only for the supported ones.
    """
    if not isinstance(schema, dict):
        return f"{where} should be an object"
    if depth > _SCHEMA_DEPTH:
        return f"{where} is nested more than {_SCHEMA_DEPTH} levels deep"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not kinds and kind is not None:
        return f"{where}.type should not be an empty list"
    for name in kinds:
        if name not in _SCHEMA_TYPES:
            return f"{where}.type {name!r} is not one of {', '.join(sorted(_SCHEMA_TYPES))}"
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            return f"{where}.properties should be an object"
        for name, sub in properties.items():
            if problem := _schema_problem(sub, f"{where}.properties.{name}", depth + 1):
                return problem
    required = schema.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(name, str) for name in required)
    ):
        return f"{where}.required should be a list of property names"
    if "items" in schema and (problem := _schema_problem(schema["items"], f"{where}.items", depth + 1)):
        return problem
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        return f"{where}.enum should be a non-empty list"
    for name in ("minItems", "maxItems", "minLength", "maxLength"):
        value = schema.get(name)
        if value is not None and not (_is_int(value) and value >= 0):
            return f"{where}.{name} should be an integer >= 0"
    for name in ("minimum", "maximum"):
        value = schema.get(name)
        if value is not None and not _is_number(value):
            return f"{where}.{name} should be a number"
    for name in ("anyOf", "oneOf"):
        options = schema.get(name)
        if options is not None:
            if not (isinstance(options, list) and options):
                return f"{where}.{name} should be a non-empty list of schemas"
            for index, sub in enumerate(options):
                if problem := _schema_problem(sub, f"{where}.{name}[{index}]", depth + 1):
                    return problem
    return None


def _schema_instance(schema: Any, seed: bytes, path: str, depth: int = 0) -> Any:
    """A deterministic JSON value valid against ``schema`` (for the keywords supported).

    Every value derives from SHA-256 of the request and its path in the document, so the same
    schema gets the same document, and two fields of the same type get different values.
    """
    numbers = _word_indices(seed + path.encode("utf-8"))
    if not isinstance(schema, dict) or depth > _SCHEMA_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[next(numbers) % len(enum)]
    if "type" not in schema:
        for name in ("anyOf", "oneOf"):
            options = schema.get(name)
            if isinstance(options, list) and options:
                return _schema_instance(options[0], seed, path, depth + 1)
    kind = _schema_kind(schema)
    if kind == "object":
        return _object_instance(schema, seed, path, depth)
    if kind == "array":
        return _array_instance(schema, seed, path, depth)
    if kind == "string":
        return _string_instance(schema, seed, path)
    if kind in ("integer", "number"):
        return _number_instance(schema, kind == "integer", next(numbers))
    if kind == "boolean":
        return next(numbers) % 2 == 0
    return None


def _schema_kind(schema: dict[str, Any]) -> str:
    """The one type to answer ``schema`` with: its own (the first besides null), else a guess."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((name for name in kind if name != "null"), "null")
    if kind not in _SCHEMA_TYPES:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    return str(kind)


def _object_instance(schema: dict[str, Any], seed: bytes, path: str, depth: int) -> dict[str, Any]:
    """Every property of ``schema``, and prose for each required one it does not describe."""
    properties = schema.get("properties")
    result = {
        name: _schema_instance(sub, seed, f"{path}.{name}", depth + 1)
        for name, sub in (properties.items() if isinstance(properties, dict) else ())
    }
    required = schema.get("required")
    for name in required if isinstance(required, list) else ():
        if isinstance(name, str) and name not in result:
            result[name] = _prose(seed + f"{path}.{name}".encode(), 2, 8)
    return result


def _array_instance(schema: dict[str, Any], seed: bytes, path: str, depth: int) -> list[Any]:
    """Two items, or as many as minItems asks for, or as few as maxItems allows."""
    min_items, max_items = schema.get("minItems"), schema.get("maxItems")
    least = min_items if _is_int(min_items) else 0
    most = max_items if _is_int(max_items) else None
    count = max(least, 2 if most is None else min(2, most))
    items = schema.get("items", {})
    return [_schema_instance(items, seed, f"{path}[{index}]", depth + 1) for index in range(count)]


def _string_instance(schema: dict[str, Any], seed: bytes, path: str) -> str:
    """A few words of prose, padded with periods to minLength and cut at maxLength."""
    text = _prose(seed + path.encode("utf-8"), 2, 8)
    shortest, longest = schema.get("minLength"), schema.get("maxLength")
    if _is_int(shortest) and len(text) < shortest:
        text = text.ljust(shortest, ".")
    if _is_int(longest):
        text = text[:longest]
    return text


def _number_instance(schema: dict[str, Any], integer: bool, draw: int) -> int | float:
    """A number within minimum and maximum (a range of 100 where they leave it open), from ``draw``."""
    low, high = schema.get("minimum"), schema.get("maximum")
    low = low if _is_number(low) else None
    high = high if _is_number(high) else None
    if low is None:
        low = 0 if high is None or high >= 0 else high - 100
    if high is None or high < low:
        high = low + 100
    if integer:
        first, last = math.ceil(low), math.floor(high)
        return first if last < first else first + draw % (last - first + 1)
    return min(high, max(low, round(low + (high - low) * draw / 65535, 2)))


def _break_json(text: str) -> str:
    """Valid JSON made invalid, the way a model that lost track does: the closing bracket missing."""
    return text[:-1] if text and text[-1] in '}]"' else text + ","
