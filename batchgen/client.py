"""One DashScope call: an HTTP attempt, and the retry policy around attempts.

The policy is a pure function of the attempt number and what the server said
(``backoff_seconds``), and the sleep is injectable, so it is tested without waiting.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base

from batchgen import __version__
from batchgen.api.native import too_large
from batchgen.api.stream import StreamAssembler
from batchgen.api.types import APIError, Disposition, Reply
from batchgen.config import RunConfig
from batchgen.ratelimit import Pacing, throttle_kind
from batchgen.sse import SSEDecoder
from batchgen.transport import Transport

BACKOFF_INITIAL = 0.5  # seconds; the official SDK's values
BACKOFF_MAX = 8.0
BACKOFF_JITTER = 0.25


_INTERRUPT = "batchgen: the run stopped"
# json.dumps with options builds an encoder per call; the body's is built once.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_SSE_STARTS = (b"id:", b"event:", b"data:", b":")


def _cause(exc: BaseException) -> BaseException:
    """What went wrong under an httpx error (httpx-aiohttp maps a refused connection to
    ConnectTimeout); aiohttp's own errors, from ``Transport.post``, name it themselves."""
    if isinstance(exc, httpx.HTTPError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


class TransientError(Exception):
    """An attempt failed in a way that may pass; tenacity retries exactly these."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class Aborted(Exception):
    """The run stopped (a fatal answer elsewhere) before this row's next attempt."""


def backoff_seconds(
    attempt: int, retry_after: float | None = None, rand: Callable[[], float] = random.random
) -> float:
    """Delay before attempt ``attempt + 1``: exponential, capped, ±25 % jitter, Retry-After wins."""
    base = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (attempt - 1))
    delay = base * (1 + BACKOFF_JITTER * (2 * rand() - 1))
    return max(delay, retry_after) if retry_after is not None else delay


def _wait(state: RetryCallState) -> float:
    """Tenacity's wait; its attempt 1 is the row's attempt 2 (see ``Caller.call``)."""
    exc = state.outcome.exception() if state.outcome else None
    retry_after = exc.error.retry_after if isinstance(exc, TransientError) else None
    return backoff_seconds(state.attempt_number + 1, retry_after)


class _stop_when(stop_base):
    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


@dataclass(slots=True)
class _Tries:
    tokens: int = 0  # estimated input + output tokens, reserved per attempt when pacing tokens
    attempts: int = 0
    last: tuple[Reply | APIError, float] | None = None  # the last attempt's result and latency
    billed: tuple[int, int] = (0, 0)  # tokens billed for streams cut before their end


@dataclass(slots=True)
class CallOutcome:
    """The end of one row's calls: a reply or the last error, with what it took."""

    reply: Reply | None
    error: APIError | None
    attempts: int
    latency_ms: float | None  # the last attempt's HTTP round trip
    http_status: int | None
    gave_up: bool = False  # retries exhausted on a transient error
    billed: tuple[int, int] = (0, 0)  # (input, output) tokens of attempts cut mid-stream


class Caller:
    """Sends request bodies with pacing and retries; one per run.

    Requests go straight to the transport: a batch needs none of ``httpx.AsyncClient``'s
    cookies, redirects, auth flows or URL merging, which cost more CPU per request than the
    HTTP exchange itself (``bench/``). The URL and headers are built once. On batchgen's own
    transport they go by ``Transport.post``, without httpx's request and response models.
    """

    def __init__(
        self,
        config: RunConfig,
        transport: httpx.AsyncBaseTransport,
        *,
        governor: Pacing,
        aborted: Callable[[], bool],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.transport = transport
        self.url = httpx.URL(config.url)
        self.dialect = config.dialect
        self.stream = config.effective_stream
        headers = {
            "Authorization": f"Bearer {config.api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"batchgen/{__version__}",
        }
        if self.stream:
            headers.update(self.dialect.stream_headers)
        if config.workspace:
            headers["X-DashScope-WorkSpace"] = config.workspace
        self.headers = httpx.Headers(headers)
        self.direct = transport if isinstance(transport, Transport) else None
        self.plain_headers = headers
        self.url_text = str(self.url)
        seconds = config.timeout
        self.extensions = {
            "timeout": {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}
        }
        self.governor = governor
        self._aborted = aborted
        self._sleep = sleep
        self._waiting: set[asyncio.Task[Any]] = set()

    def interrupt(self) -> None:
        """The run stopped: end every pacing or backoff wait now, not when its slot comes."""
        for task in list(self._waiting):
            task.cancel(_INTERRUPT)

    async def _hold(self, waiting: Awaitable[Any]) -> None:
        """Await a pacing slot or a backoff sleep that ``interrupt`` can cut short."""
        if self._aborted():
            raise Aborted
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            await waiting
        except asyncio.CancelledError as exc:
            if exc.args != (_INTERRUPT,):
                raise
            task.uncancel()
            raise Aborted from None
        finally:
            self._waiting.discard(task)
        if self._aborted():
            raise Aborted

    async def _backoff(self, seconds: float) -> None:
        await self._hold(self._sleep(seconds))

    async def _post(
        self, content: bytes, deadline: asyncio.Timeout, streams: list[StreamAssembler]
    ) -> Reply | APIError:
        direct = self.direct
        if direct is None:
            return await self._post_httpx(content, deadline, streams)
        response = await direct.post(self.url_text, self.plain_headers, content)
        try:
            status, headers = response.status, response.headers
            if headers.get("content-type", "").startswith("text/event-stream"):
                chunks = response.content.iter_any()
                return await self._read_stream(chunks, status, headers, deadline, b"", streams)
            raw = await response.read()
        finally:
            response.release()
            await response.wait_for_close()
        return await self._interpret(status, headers, raw, deadline, streams)

    async def _post_httpx(
        self, content: bytes, deadline: asyncio.Timeout, streams: list[StreamAssembler]
    ) -> Reply | APIError:
        """``_post`` through any httpx transport, with httpx's models."""
        request = httpx.Request(
            "POST", self.url, headers=self.headers, content=content, extensions=self.extensions
        )
        response = await self.transport.handle_async_request(request)
        status, headers = response.status_code, response.headers
        chunks: AsyncIterator[bytes] = response.stream.__aiter__()  # type: ignore[union-attr]
        try:
            if headers.get("content-type", "").startswith("text/event-stream"):
                return await self._read_stream(chunks, status, headers, deadline, b"", streams)
            # The raw stream: no Accept-Encoding is sent, so the body is not compressed, and
            # httpx's decoder pipeline costs more CPU than the read itself.
            raw = b"".join([chunk async for chunk in chunks])
        finally:
            await response.aclose()
        return await self._interpret(status, headers, raw, deadline, streams)

    async def _interpret(
        self,
        status: int,
        headers: Mapping[str, str],
        raw: bytes,
        deadline: asyncio.Timeout,
        streams: list[StreamAssembler],
    ) -> Reply | APIError:
        if self.stream and raw.lstrip().startswith(_SSE_STARTS):  # events under a wrong label
            return await self._read_stream(None, status, headers, deadline, raw, streams)
        return self.dialect.interpret(status, headers, raw)

    async def _read_stream(
        self,
        chunks: AsyncIterator[bytes] | None,
        status: int,
        headers: Mapping[str, str],
        deadline: asyncio.Timeout,
        raw: bytes,
        streams: list[StreamAssembler],
    ) -> Reply | APIError:
        """Assemble a streamed answer as it arrives; an error event or a cut ends it early.

        ``--timeout`` bounds the silence between chunks, not the whole answer: a long thinking
        reply that keeps streaming is never cut (and billed again) for being long. Events
        under a non-200 status (an error sent as SSE) default to that status. The assembler
        goes to ``streams`` so that what a broken stream was billed is known whatever ends it.
        ``chunks`` None: the events are ``raw``, a whole body read under another content type.
        """
        assembler = self.dialect.stream(headers.get("x-request-id"))
        streams.append(assembler)
        decoder = SSEDecoder()
        loop = asyncio.get_running_loop()

        def take(events: list[Any]) -> APIError | None:
            for event in events:
                if status != 200 and event.status is None:
                    event = replace(event, status=status)
                error = assembler.add(event)
                if error is not None:
                    return error
            return None

        try:
            if chunks is None:
                error = take(decoder.feed(raw))
                if error is not None:
                    return error
            else:
                async for chunk in chunks:
                    deadline.reschedule(loop.time() + self.config.timeout)
                    error = take(decoder.feed(chunk))
                    if error is not None:
                        return error
        except Exception as exc:  # the connection broke mid-stream: what came is not enough
            cause = _cause(exc)
            return assembler.cut(f"the stream broke ({type(cause).__name__}: {str(cause) or 'no detail'})")
        error = take(decoder.close())
        if error is not None:
            return error
        if status != 200:  # an SSE body under an error status, with no error event in it
            return self.dialect.interpret(status, headers, raw)
        return assembler.result()

    async def _attempt(self, content: bytes, tries: _Tries) -> tuple[Reply | APIError, float]:
        if self._aborted():
            raise Aborted
        if not self.governor.admit_now(tries.tokens):
            await self._hold(self.governor.acquire(tries.tokens))
        tries.attempts += 1
        result, elapsed = await self._exchange(content)
        billed = (0, 0)
        if isinstance(result, APIError) and result.billed is not None:
            billed = result.billed
            tries.billed = (tries.billed[0] + billed[0], tries.billed[1] + billed[1])
        governor = self.governor
        if isinstance(result, Reply):
            used = (result.input_tokens or 0) + (result.output_tokens or 0)
            governor.settle(tries.tokens, used or tries.tokens)
            if result.output_tokens is not None:
                governor.observed_output(result.output_tokens)
        else:
            governor.settle(tries.tokens, sum(billed))  # an error bills nothing, a cut stream some
            if result.http_status == 429:
                kind = throttle_kind(result.code, result.message)
                if kind is not None and result.disposition is Disposition.RETRY:
                    governor.throttled(kind)
        return result, elapsed

    async def _exchange(self, content: bytes) -> tuple[Reply | APIError, float]:
        streams: list[StreamAssembler] = []
        result, elapsed = await self._timed(content, streams)
        if isinstance(result, APIError) and streams and result.billed is None:
            # A stream that ended without its answer (cut, silent, or an error event after
            # some output) was billed for what it generated, as its last usage says.
            result = replace(result, billed=streams[0].billed())
        return result, elapsed

    async def _timed(self, content: bytes, streams: list[StreamAssembler]) -> tuple[Reply | APIError, float]:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.timeout) as deadline:
                result = await self._post(content, deadline, streams)
        except TimeoutError:
            elapsed = (time.perf_counter() - started) * 1000
            silence = "nothing more of the stream" if self.stream else "no answer"
            return APIError(
                None,
                "batchgen.Timeout",
                f"{silence} within --timeout {self.config.timeout:g} s",
                None,
                Disposition.RETRY,
            ), elapsed
        except Exception as exc:  # httpx's errors, and whatever the transport lets through
            elapsed = (time.perf_counter() - started) * 1000
            cause = _cause(exc)
            detail = str(cause) or type(cause).__name__
            return APIError(
                None, "batchgen.ConnectionError", f"{type(cause).__name__}: {detail}", None, Disposition.RETRY
            ), elapsed
        return result, (time.perf_counter() - started) * 1000

    async def _try(self, content: bytes, tries: _Tries) -> None:
        tries.last = await self._attempt(content, tries)
        result = tries.last[0]
        if isinstance(result, APIError) and result.disposition is Disposition.RETRY:
            raise TransientError(result)

    async def _retry(self, content: bytes, tries: _Tries, first: TransientError) -> None:
        """Attempts 2 to ``max_attempts``, under tenacity, once the first failed transiently."""
        if self.config.max_attempts == 1 or self._aborted():
            raise first
        await self._backoff(backoff_seconds(1, first.error.retry_after))
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.max_attempts - 1) | _stop_when(self._aborted),
            wait=_wait,
            retry=retry_if_exception_type(TransientError),
            sleep=self._backoff,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._try(content, tries)

    async def call(self, body: dict[str, Any], tokens: int = 0) -> CallOutcome:
        """Send ``body`` until it succeeds, fails for good, runs out of attempts or the run stops.

        The first attempt runs outside tenacity: most rows succeed at once, and the retry
        machinery costs about a tenth of a millisecond of CPU per row (``bench/``).
        """
        if self.stream:
            body = self.dialect.streamed_body(body)
        content = _ENCODE(body).encode()
        refused = too_large(content) if self.config.dashscope else None
        if refused is not None:
            return CallOutcome(None, refused, 0, None, None)
        tries = _Tries(tokens)
        try:
            try:
                await self._try(content, tries)
            except TransientError as first:
                await self._retry(content, tries, first)
        except TransientError as exc:
            assert tries.last is not None
            return CallOutcome(
                None,
                exc.error,
                tries.attempts,
                tries.last[1],
                exc.error.http_status,
                gave_up=not self._aborted(),
                billed=tries.billed,
            )
        except Aborted:
            if tries.last is None:
                return CallOutcome(None, None, tries.attempts, None, None, billed=tries.billed)
            error = tries.last[0]
            assert isinstance(error, APIError)
            return CallOutcome(
                None, error, tries.attempts, tries.last[1], error.http_status, billed=tries.billed
            )
        assert tries.last is not None
        result, latency = tries.last
        if isinstance(result, Reply):
            return CallOutcome(result, None, tries.attempts, latency, 200, billed=tries.billed)
        return CallOutcome(None, result, tries.attempts, latency, result.http_status, billed=tries.billed)
