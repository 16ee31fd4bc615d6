"""Token counting, the text of messages, and the deterministic prose that replies are made of."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from typing import Any

# One token per CJK ideograph, kana or Hangul character: roughly what Qwen's BPE does, and far
# from the 1-per-4-bytes rule that holds for Latin text.
_CJK_RE = re.compile(
    "[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)


def count_tokens(text: str) -> int:
    """Estimate the tokens of ``text``, cheaply and deterministically.

    Each CJK, kana or Hangul character is one token; the remaining text costs one token per
    4 UTF-8 bytes, rounded up; non-empty text costs at least 1. It is not Qwen's tokenizer,
    but it is consistent, so the usage the simulator reports adds up exactly in tests.
    """
    if not text:
        return 0
    if text.isascii():
        return max(1, -(-len(text) // 4))
    rest = _CJK_RE.sub("", text)
    cjk = len(text) - len(rest)
    return max(1, cjk + math.ceil(len(rest.encode("utf-8")) / 4))


def _cut_to_tokens(text: str, limit: int) -> str:
    """Return the longest prefix of ``text`` that fits in ``limit`` tokens.

    count_tokens grows by at most 1 per character, so the longest fitting prefix of a text
    that does not fit costs exactly ``limit`` tokens, like a real cut at max_tokens.
    """
    lo, hi = 0, len(text)  # invariant: text[:lo] fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


# Ordinary words, so that replies read as prose in a result file or a demo.
_VOCABULARY_TEXT = """
about above across after again answer approach around balance batch better between
brief careful case change clear close common complete consider context cost course
current data detail different direct each early easy effect enough example fact field
final first focus follow form general given good great group guide help high idea
important include input large later learn level light likely limit line list local long
main make many mean method model more most move much need next note number often order
other output part people place plan point possible practical problem process question
quick rather reason record result right rule same short simple small some source
specific start state step still strong such summary system table task term test text
these thing think through time together useful usual value various view well while
whole within word work world write
"""
_VOCABULARY = tuple(_VOCABULARY_TEXT.split())


def _word_indices(seed: bytes) -> Iterator[int]:
    """An endless, deterministic stream of 16-bit numbers derived from ``seed`` by SHA-256."""
    counter = 0
    while True:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        for i in range(0, len(block), 2):
            yield int.from_bytes(block[i : i + 2], "big")
        counter += 1


def _prose(seed: bytes, min_words: int, max_words: int) -> str:
    """Deterministic plausible-looking sentences of ordinary words, ending with a period."""
    numbers = _word_indices(seed)
    count = min_words + next(numbers) % (max_words - min_words + 1)
    sentences: list[str] = []
    words: list[str] = []
    sentence_length = 5 + next(numbers) % 8
    for _ in range(count):
        words.append(_VOCABULARY[next(numbers) % len(_VOCABULARY)])
        if len(words) == sentence_length:
            sentences.append(" ".join(words).capitalize() + ".")
            words = []
            sentence_length = 5 + next(numbers) % 8
    if words:
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def _message_text(message: Any) -> str:
    """The text of a message whose content is a string or a list of parts (images count 0)."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _snippet(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."
