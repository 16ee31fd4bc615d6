"""Server-sent events, decoded incrementally from the bytes of a streamed response.

DashScope's streams are SSE with two quirks the decoder keeps rather than hides: an
``event:error`` arrives under HTTP 200, and the real status rides in a comment line
(``:HTTP_STATUS/429``). OpenAI-compatible servers send plain ``data:`` lines ending with
``data: [DONE]``. Both are decoded here; what the events mean is ``protocol`` / ``compat``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_STATUS_COMMENT = re.compile(r"HTTP_STATUS/(\d{3})")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its type (``message`` unless named), data, id and status comment."""

    event: str
    data: str
    id: str | None = None
    status: int | None = None  # from a ``:HTTP_STATUS/NNN`` comment, DashScope's real status


class SSEDecoder:
    """Feed it chunks as they arrive; it returns the events each chunk completes.

    Follows the SSE rules that matter here: lines end with LF, CRLF or CR; a blank line
    dispatches; ``field: value`` loses one leading space; several ``data`` lines join with LF;
    lines starting with ``:`` are comments; an event with no data is dropped.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._status: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        *lines, self._buffer = re.split(rb"\r\n|\n|\r(?!$)", self._buffer)
        # A CR at the very end may be half of a CRLF split across chunks: keep it for later.
        events = []
        for line in lines:
            event = self._line(line.decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[SSEEvent]:
        """The stream ended: whatever was pending without its blank line is dispatched too."""
        events = self.feed(b"\n") if self._buffer else []
        event = self._dispatch()
        return [*events, event] if event is not None else events

    def _line(self, line: str) -> SSEEvent | None:
        line = line.rstrip("\r")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            match = _STATUS_COMMENT.match(line[1:].strip())
            if match:
                self._status = int(match.group(1))
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        event = (
            SSEEvent(self._event or "message", "\n".join(self._data), self._id, self._status)
            if self._data
            else None
        )
        self._event, self._data, self._status = "", [], None
        return event
