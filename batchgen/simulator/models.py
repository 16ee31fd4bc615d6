"""The models: which exist, which route serves them, which think, which answer only streamed calls."""

from __future__ import annotations

import re
from typing import Any

_KNOWN_MODEL_RE = re.compile(
    r"qwen-(?:max|plus|turbo|flash|long|omni)"
    r"|qwen3-(?:max|coder|omni)"
    r"|qwen3\.[567]-|qwq-|qvq-|qwen-vl-|qwen3-vl-|qwen2\.5-"
    r"|qwen3-\d+(?:\.\d+)?b"
    r"|batch-test-model$"
)
# Thinking: qwq/qvq and the open-source "-thinking" snapshots always think; the open-source
# hybrid Qwen3 models (qwen3-8b, qwen3-235b-a22b, ...) think unless told not to; every other
# hybrid model (qwen-plus, qwen3-max, qwen3.5-plus, ...) thinks only when told to.
_ALWAYS_THINKS_RE = re.compile(r"qwq-|qvq-|qwen3-[\w.-]*-thinking")
_OPEN_HYBRID_RE = re.compile(r"qwen3-\d+(?:\.\d+)?b(?:-a\d+(?:\.\d+)?b)?$")
# Models that refuse non-streamed calls whatever the parameters.
_STREAM_ONLY_RE = re.compile(r"qwq-|qvq-|qwen-omni|qwen3-omni|qwen2\.5-omni|qwen3-[\w.-]*-thinking")


def _is_multimodal_model(model: str) -> bool:
    # qwen3.5+ families are served only by the multimodal route, even for text-only input.
    return (
        model.startswith(("qwen3.5-", "qwen3.6-", "qwen3.7-", "qvq-")) or "-vl" in model or ("omni" in model)
    )


def _thinks(model: str, enable_thinking: Any) -> bool:
    if _ALWAYS_THINKS_RE.match(model):
        return True
    if _OPEN_HYBRID_RE.match(model):
        return enable_thinking is not False
    return enable_thinking is True


def only_streamed(model: str, parameters: dict) -> bool:
    """Whether the real service refuses this call unless it is streamed.

    qwq-/qvq- models, the omni models and the open-source "-thinking" snapshots answer streamed
    calls only; the open-source hybrid Qwen3 models (qwen3-8b, qwen3-235b-a22b, ...) do while they
    think, which is by default (``parameters["enable_thinking"]`` false turns it off). Commercial
    hybrids (qwen-plus, qwen3-max, qwen3.5-plus, ...) think non-streamed too. ``parameters`` is
    the native ``parameters`` object, or the OpenAI body (its extras are top-level keys).
    """
    if _STREAM_ONLY_RE.match(model):
        return True
    return bool(_OPEN_HYBRID_RE.match(model)) and _thinks(model, parameters.get("enable_thinking"))
