"""The Batch API's management calls: files and batches, each retried as a real-time call is.

Few calls, so a plain ``httpx.AsyncClient``; 429s, 5xx and broken connections are retried
with the run's backoff (``client.backoff_seconds``, Retry-After honoured) under tenacity. An
upload or a create whose answer never came (the connection broke after sending, or a 5xx:
the server may have acted before failing) is *not* sent again blindly: it raises
:class:`LostAnswer` and the caller looks for the file or batch first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from batchgen import __version__
from batchgen.api.faults import find
from batchgen.api.openai import interpret
from batchgen.api.types import APIError, Disposition
from batchgen.client import TransientError, backoff_seconds
from batchgen.config import RunConfig
from batchgen.errors import FatalAPIError

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
ATTEMPTS = 8
LIST_PAGE = 100


class LostAnswer(Exception):
    """A call that may have taken effect got no answer (the connection broke after sending)."""


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome is not None else None
    retry_after = exc.error.retry_after if isinstance(exc, TransientError) else None
    return backoff_seconds(state.attempt_number, retry_after)


@dataclass(frozen=True, slots=True)
class RemoteBatch:
    """A batch as the service last described it."""

    id: str
    status: str
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    completion_window: str
    total: int
    completed: int
    failed: int
    metadata: Mapping[str, Any]
    errors: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def of(cls, body: Any) -> RemoteBatch:
        """The batch a body describes; a body no client could read is a one-line error."""
        if not isinstance(body, Mapping) or not isinstance(body.get("id"), str):
            raise FatalAPIError(f"the Batch API described a batch without an id: {str(body)[:120]!r}")
        try:
            return cls._of(body)
        except (TypeError, ValueError, OverflowError, AttributeError):
            raise FatalAPIError(
                f"the Batch API described batch {body['id']} unreadably: {str(body)[:200]!r}"
            ) from None

    @classmethod
    def _of(cls, body: Mapping[str, Any]) -> RemoteBatch:
        counts = body.get("request_counts") or {}
        errors = body.get("errors") or {}
        errors = errors.get("data") or [] if isinstance(errors, Mapping) else errors
        metadata = body.get("metadata")
        return cls(
            id=body["id"],
            status=str(body.get("status") or "unknown"),
            input_file_id=_text(body.get("input_file_id")),
            output_file_id=_text(body.get("output_file_id")),
            error_file_id=_text(body.get("error_file_id")),
            created_at=int(body.get("created_at") or 0),
            completion_window=str(body.get("completion_window") or "24h"),
            total=int(counts.get("total") or 0),
            completed=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            metadata=metadata if isinstance(metadata, Mapping) else {},
            errors=tuple(e for e in errors if isinstance(e, Mapping)) if isinstance(errors, list) else (),
        )

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


class BatchAPI:
    """The files and batches endpoints under the run's OpenAI-compatible base URL."""

    def __init__(
        self,
        config: RunConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {config.api_key}", "User-Agent": f"batchgen/{__version__}"}
        if config.workspace:
            headers["X-DashScope-WorkSpace"] = config.workspace
        self._http = httpx.AsyncClient(
            base_url=config.base_url + "/", headers=headers, timeout=config.timeout, transport=transport
        )
        self._sleep = sleep

    async def __aenter__(self) -> BatchAPI:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    # -- one call ----------------------------------------------------------------------------
    async def _once(
        self, method: str, path: str, *, resend: bool, stream: bool, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = await self._http.send(self._http.build_request(method, path, **kwargs), stream=stream)
        except httpx.TransportError as exc:
            if not resend and not isinstance(exc, httpx.ConnectError):
                raise LostAnswer(f"{method} {path}: {type(exc).__name__}") from exc
            error = APIError(None, "batchgen.ConnectionError", f"{type(exc).__name__}: {exc}", None,
                             Disposition.RETRY)  # fmt: skip
            raise TransientError(error) from exc
        if response.status_code < 400:
            return response
        await response.aread()  # an error body is small; a streamed answer is read only here
        if not resend and response.status_code >= 500:  # it may have been done before it failed
            raise LostAnswer(f"{method} {path}: HTTP {response.status_code}")
        outcome = interpret(response.status_code, response.headers, response.content)
        assert isinstance(outcome, APIError)
        if response.status_code == 429 or response.status_code >= 500:  # a 409 is a state, not a fault
            raise TransientError(outcome)
        raise _refused(method, path, outcome)

    async def _call(
        self, method: str, path: str, *, resend: bool = True, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS), wait=_wait, retry=retry_if_exception_type(TransientError),
            sleep=self._sleep, reraise=True,
        )  # fmt: skip
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(method, path, resend=resend, stream=stream, **kwargs)
        except TransientError as exc:
            raise _refused(method, path, exc.error, f" after {ATTEMPTS} attempts") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._call(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if not isinstance(body, dict):
            raise FatalAPIError(
                f"the Batch API answered {method} {path} with {str(body)[:80]!r}, not a JSON object"
            )
        return body

    # -- files -------------------------------------------------------------------------------
    async def upload(self, name: str, path: Path) -> str:
        """Upload a JSONL input file (``purpose=batch``); its file id. An upload whose answer
        was lost is looked for by ``name`` before it is sent again (storage is limited)."""
        for _ in range(ATTEMPTS):
            try:
                with path.open("rb") as content:  # streamed: a file may be 500 MB
                    files = {"file": (name, content, "application/jsonl")}
                    body = await self._json(
                        "POST", "files", files=files, data={"purpose": "batch"}, resend=False
                    )
                if not isinstance(body.get("id"), str):
                    raise FatalAPIError(
                        f"the Batch API stored {name} without naming its id: {str(body)[:120]!r}"
                    )
                return body["id"]
            except LostAnswer:
                stored = await self.files_named(name)
                if stored:
                    return stored[0]
        raise FatalAPIError(f"the Batch API never answered the upload of {name}: try again later")

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """An output or error file's lines, streamed (the file is never held whole). A download
        broken off midway raises: the caller records nothing of a batch until it has read all."""
        response = await self._call("GET", f"files/{file_id}/content", stream=True)
        try:
            buffer = b""
            async for chunk in response.aiter_bytes():
                *whole, buffer = (buffer + chunk).split(b"\n")
                for line in whole:
                    if line.strip():
                        yield line
            if buffer.strip():
                yield buffer
        except httpx.TransportError as exc:
            raise FatalAPIError(
                f"the download of file {file_id} broke off ({type(exc).__name__}): run again to collect it"
            ) from exc
        finally:
            await response.aclose()

    async def _pages(self, path: str, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Every object of a list endpoint, page by page (``after`` the last id of each)."""
        after: str | None = None
        while True:
            page = await self._json(
                "GET", path, params={**params, "limit": LIST_PAGE, **({"after": after} if after else {})}
            )
            data = page.get("data")
            items = (
                [i for i in data if isinstance(i, dict) and isinstance(i.get("id"), str)]
                if isinstance(data, list)
                else []
            )
            for item in items:
                yield item
            if not page.get("has_more") or not items or items[-1]["id"] == after:  # no page past the last
                return
            after = items[-1]["id"]

    async def files_named(self, filename: str) -> list[str]:
        """The ids of stored files called ``filename`` (every page of the file list)."""
        return [f["id"] async for f in self._pages("files", {}) if f.get("filename") == filename]

    async def delete(self, file_id: str) -> None:
        """Free a file's storage (10,000 files / 100 GB an account); one already gone is fine."""
        try:
            await self._call("DELETE", f"files/{file_id}")
        except FatalAPIError as exc:
            if exc.http_status != 404:
                raise

    # -- batches -----------------------------------------------------------------------------
    async def create(self, file_id: str, window: str, metadata: Mapping[str, str]) -> RemoteBatch:
        """Create a batch; raises :class:`LostAnswer` when it may exist without an answer."""
        payload = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                   "completion_window": window, "metadata": dict(metadata)}  # fmt: skip
        return RemoteBatch.of(await self._json("POST", "batches", json=payload, resend=False))

    async def retrieve(self, batch_id: str) -> RemoteBatch:
        return RemoteBatch.of(await self._json("GET", f"batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> RemoteBatch:
        return RemoteBatch.of(await self._json("POST", f"batches/{batch_id}/cancel"))

    async def find(self, name: str, file_id: str) -> list[RemoteBatch]:
        """The batches made from ``file_id`` whose ``metadata.ds_name`` is ``name``, oldest
        first (the list endpoint, every page; its ``ds_name`` filter matches substrings)."""
        params = {"ds_name": name, "input_file_ids": file_id}
        found = [RemoteBatch.of(b) async for b in self._pages("batches", params)]
        mine = [b for b in found if b.metadata.get("ds_name") == name and b.input_file_id == file_id]
        return sorted(reversed(mine), key=lambda b: b.created_at)  # the list is newest first


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _refused(method: str, path: str, error: APIError, detail: str = "") -> FatalAPIError:
    status = f"HTTP {error.http_status} " if error.http_status else ""
    said = f" ({error.message.strip()})" if error.message.strip() else ""
    fault = find(error.code, error.message)
    hint = f": {fault.hint}" if fault is not None and fault.hint else ""
    message = f"the Batch API refused {method} {path}{detail}: {status}{error.code}{said}{hint}"
    return FatalAPIError(message, code=error.code, http_status=error.http_status)
