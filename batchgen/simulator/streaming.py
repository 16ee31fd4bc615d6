"""A reply cut into the deltas of an event stream, with the usage billed up to each."""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchgen.simulator.replies import SimReply
from batchgen.simulator.text import count_tokens

# A few words per event, and no more than a few characters of a long word (CJK text has no
# spaces), so that every ordinary reply streams in several events.
_STREAM_WORDS = 4
_STREAM_CHARS = 16


def _stream_deltas(text: str) -> list[str]:
    """``text`` split into the deltas of a stream; they join up to exactly ``text``."""
    words = re.findall(r"\s*\S+\s*", text) or ([text] if text else [])
    pieces = [word[i : i + _STREAM_CHARS] for word in words for i in range(0, len(word), _STREAM_CHARS)]
    return ["".join(pieces[i : i + _STREAM_WORDS]) for i in range(0, len(pieces), _STREAM_WORDS)]


@dataclass(frozen=True)
class _Piece:
    """One event's worth of a streamed reply, with the usage billed up to it."""

    reasoning: str  # this event's reasoning delta ("" once the answer has started)
    content: str  # this event's answer delta ("" while reasoning)
    content_so_far: str
    output_tokens: int
    reasoning_tokens: int


def _stream_pieces(reply: SimReply) -> list[_Piece]:
    """Reasoning deltas first, then answer deltas, each with its cumulative usage.

    The last piece's usage is the reply's own (count_tokens of the whole texts), so a client
    that keeps the last usage of a stream bills exactly what a non-streamed call would.
    """
    pieces: list[_Piece] = []
    reasoning_so_far = ""
    for delta in _stream_deltas(reply.reasoning or ""):
        reasoning_so_far += delta
        tokens = count_tokens(reasoning_so_far)
        pieces.append(_Piece(delta, "", "", tokens, tokens))
    content_so_far = ""
    for delta in _stream_deltas(reply.content):
        content_so_far += delta
        output_tokens = reply.reasoning_tokens + count_tokens(content_so_far)
        pieces.append(_Piece("", delta, content_so_far, output_tokens, reply.reasoning_tokens))
    return pieces
