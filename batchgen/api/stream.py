"""The assembler that builds one ``Reply`` from the chunks of a streamed answer, either dialect."""

from __future__ import annotations

from typing import Any

from batchgen.api.types import APIError, Disposition, Reply

USAGE_FIELDS = ("input_tokens", "output_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


class StreamAssembler:
    """Builds one ``Reply`` from the chunks of a streamed answer, whatever the dialect.

    Chunks carry deltas (``incremental_output: true``; OpenAI streams always do) and the
    cumulative usage, so texts are joined and the last usage seen is kept. A stream that ends
    before its final chunk is a ``batchgen.StreamCut``, retried like a dropped connection.
    """

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id
        self.chunks = 0
        self.finished = False
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._finish: str | None = None
        self._usage: dict[str, int | None] = {}

    def add(self, event: Any) -> APIError | None:
        """Take one SSE event (``sse.Event``); an error it carries ends the call. Per dialect."""
        raise NotImplementedError

    def merge(self, chunk: Reply) -> None:
        self.chunks += 1
        if chunk.request_id and not self.request_id:
            self.request_id = chunk.request_id
        if chunk.content:
            self._content.append(chunk.content)
        if chunk.reasoning:
            self._reasoning.append(chunk.reasoning)
        if chunk.finish_reason:
            self._finish = chunk.finish_reason
        for name in USAGE_FIELDS:
            value = getattr(chunk, name)
            if value is not None:
                self._usage[name] = value

    @property
    def has_finish(self) -> bool:
        return self._finish is not None

    def cut(self, why: str) -> APIError:
        """The stream ended early: sent again (``Caller`` adds what it was billed)."""
        return APIError(
            200,
            "batchgen.StreamCut",
            f"{why} after {self.chunks} chunk{'s' if self.chunks != 1 else ''}",
            self.request_id,
            Disposition.RETRY,
        )

    def billed(self) -> tuple[int, int] | None:
        """(input, output) tokens as the last usage seen says, for a stream that broke off.

        DashScope's native chunks carry the usage so far; an OpenAI stream gives it only at the
        end, so a broken one's cost is not known (None).
        """
        tokens = (self._usage.get("input_tokens"), self._usage.get("output_tokens"))
        return (tokens[0] or 0, tokens[1] or 0) if any(tokens) else None

    def result(self) -> Reply | APIError:
        if not self.finished:
            return self.cut("the stream ended before its last chunk")
        usage = dict(self._usage)
        if usage.get("total_tokens") is None and None not in (
            usage.get("input_tokens"),
            usage.get("output_tokens"),
        ):
            usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]  # type: ignore[operator]
        return Reply(
            content="".join(self._content) or None,
            reasoning="".join(self._reasoning) or None,
            finish_reason=self._finish,
            request_id=self.request_id,
            **{name: usage.get(name) for name in USAGE_FIELDS},
        )


def stream_error(status: int, raw: str, request_id: str | None) -> APIError:
    detail = raw[:120].strip() or "empty"
    return APIError(
        status,
        "batchgen.BadResponse",
        f"a stream event that is not a JSON object: {detail}",
        request_id,
        Disposition.RETRY,
    )
