"""DashScope's rules about models: the route each is served on, which answer only streamed,
which think. Learnt from the service's refusals (``shared/dashscope-protocol.md``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from batchgen.api.types import Route

# VL, QVQ and omni models are multimodal by nature.
_MULTIMODAL_MODEL = re.compile(r"^qwen3\.[5-9]|(^|[-_.])vl([-_.]|$)|^qvq|omni")


def route_for_model(model: str) -> Route:
    """The route DashScope serves ``model`` on."""
    return "multimodal" if _MULTIMODAL_MODEL.search(model.lower()) else "text"


# Open-source Qwen3 checkpoints (qwen3-8b, qwen3-235b-a22b, ...) think by default and think

# only in streamed calls; QwQ / QVQ always think; omni models answer only streamed.
OPEN_QWEN3 = re.compile(r"^qwen3-\d+(\.\d+)?b(-a\d+(\.\d+)?b)?$")
_STREAM_ONLY = re.compile(r"^(qwq|qvq)|omni|^qwen3-[\w.-]*-thinking")


def needs_stream(model: str, parameters: Mapping[str, Any]) -> bool:
    """Whether DashScope answers ``model`` with these parameters only as a streamed call.

    Non-streamed, such requests fail ("parameter.enable_thinking must be set to false for
    non-streaming calls", "... only support stream ..."). The simulator has the same rule
    (``simulator.only_streamed``); ``tests/test_wire.py`` holds the two equal.
    """
    name = model.lower()
    if _STREAM_ONLY.search(name):
        return True
    return bool(OPEN_QWEN3.match(name)) and parameters.get("enable_thinking") is not False


def stream_by_default(model: str, parameters: Mapping[str, Any]) -> bool:
    """batchgen's choice without --stream/--no-stream: streamed where required, and whenever
    thinking is asked for (DashScope refuses some hybrids' unstreamed thinking too, with
    "enable_thinking must be set to false for non-streaming calls"; streaming costs nothing)."""
    return needs_stream(model, parameters) or parameters.get("enable_thinking") is True


def thinks(model: str, parameters: Mapping[str, Any]) -> bool | None:
    """True/False when the request's mode is known, None when the model decides (hybrid default)."""
    if parameters.get("enable_thinking") is not None:
        return bool(parameters["enable_thinking"])
    if model.startswith(("qwq", "qvq")) or "thinking" in model or OPEN_QWEN3.match(model):
        return True  # open-source Qwen3 thinks unless told not to
    return None
