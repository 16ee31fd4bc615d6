"""The simulator's aiohttp server (:class:`Simulator`): routes, the gateway's checks in order, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from batchgen.simulator.batches import BATCHES_PATH, FILES_PATH, BatchService
from batchgen.simulator.config import _FAULT_ORDER, FaultName, SimulatorConfig, SimulatorStats
from batchgen.simulator.errors import (
    _MSG_INVALID_KEY,
    _MSG_RATE_QUOTA,
    _MSG_TOKEN_QUOTA,
    _ApiError,
    _bad_request,
    _error_payload,
    _fault_error,
    _too_large,
)
from batchgen.simulator.quota import TokenBucket
from batchgen.simulator.replies import simulated_reply
from batchgen.simulator.validation import (
    _check_images,
    _check_markers,
    _check_response_format,
    _check_route,
    _check_streaming,
)
from batchgen.simulator.wire import (
    _SSE_CONTENT_TYPE,
    _Answer,
    _Call,
    _dumps,
    _error_answer,
    _json_response,
    _success_answer,
)

TEXT_PATH = "/api/v1/services/aigc/text-generation/generation"
MULTIMODAL_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
# The OpenAI-compatible mode lives beside /api/v1 on the same host, not under it.
COMPATIBLE_PATH = "/compatible-mode/v1/chat/completions"
_ROUTES = {TEXT_PATH: "text", MULTIMODAL_PATH: "multimodal", COMPATIBLE_PATH: "openai"}

# The real gateway's body limits: 64 MiB when images travel inline as base64, 16 MiB otherwise.
_BODY_LIMIT = 64 * 1024 * 1024
_BODY_LIMIT_WITHOUT_BASE64 = 16 * 1024 * 1024
# aiohttp's own limit sits above the gateway's, so a too large body gets DashScope's 413 JSON
# answer from the simulator rather than aiohttp's plain-text one.
_CLIENT_MAX_SIZE = 70 * 1024 * 1024


# How the simulator waits out its latency and its hangs (asyncio.sleep unless told otherwise).
Sleep = Callable[[float], Awaitable[object]]
# What it reads the time from, in seconds, for its quotas and stats (time.monotonic).
Clock = Callable[[], float]


class Simulator:
    """The DashScope simulator as an aiohttp server on the caller's event loop.

    ``sleep`` is how it waits out its latency and its hangs, and ``clock`` the time its quotas
    refill by and its stats record: ``asyncio.sleep`` and ``time.monotonic``, or a test's
    stand-ins (a sleep that records the delays asked for, a clock that stands still).
    """

    def __init__(
        self,
        config: SimulatorConfig = SimulatorConfig(),
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self._wait = sleep
        self._clock = clock
        self.stats = SimulatorStats()
        self._rng = random.Random(config.seed)
        self._auth = f"Bearer {config.key}"
        self._bucket: TokenBucket | None = None
        self._token_bucket: TokenBucket | None = None
        self._fault_thresholds: list[tuple[float, FaultName]] = []
        cumulative = 0.0
        for name in _FAULT_ORDER:
            probability = getattr(config, name)
            if probability > 0:
                cumulative += probability
                self._fault_thresholds.append((cumulative, name))
        self._batches = BatchService(config, self.stats, clock)
        self._runner: web.AppRunner | None = None
        self._sleepers: set[asyncio.Task[Any]] = set()
        self._stopping = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the native API base URL.

        The OpenAI-compatible base URL is the same origin with ``/compatible-mode/v1``.
        """
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Per-request access logs would cost more than the simulated work at benchmark rates.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._stopping = False
        if self.config.rpm is not None:
            self._bucket = TokenBucket(self.config.rpm, self._clock())
        if self.config.tpm is not None:
            self._token_bucket = TokenBucket(self.config.tpm, self._clock())
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        return f"http://{url_host}:{bound_port}/api/v1"

    async def stop(self) -> None:
        """Stop serving; requests that hang or sleep are cancelled, not waited for.

        A hang fault lasts ten minutes by default: a test tearing down must not inherit it.
        """
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        for task in list(self._sleepers):
            task.cancel()
        await runner.cleanup()

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            raise asyncio.CancelledError
        task = asyncio.current_task()
        assert task is not None
        self._sleepers.add(task)
        try:
            await self._wait(seconds)
        finally:
            self._sleepers.discard(task)

    def _draw_fault(self) -> FaultName | None:
        if not self._fault_thresholds:
            return None
        draw = self._rng.random()
        for threshold, name in self._fault_thresholds:
            if draw < threshold:
                return name
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request, checking in the gateway's order: key, quota, then the body.

        The order is observable (a throttled request with a bad body gets 429, not 400), and a
        client's error handling is only tested if it meets the errors in the real order.
        """
        if request.path.startswith((FILES_PATH, BATCHES_PATH)):  # the Files and Batch API
            api = "files" if request.path.startswith(FILES_PATH) else "batches"
            self._count_arrival(request, api, self._clock())
            return await self._batches.handle(request)
        request_id = str(uuid.uuid4())
        route = _ROUTES.get(request.path) if request.method == "POST" else None
        if route is None:
            payload = _error_payload("NotFound", "Not Found", request_id)
            return _json_response(404, payload, request_id)

        now = self._clock()
        self._count_arrival(request, route, now)
        # A native stream is asked for in a header, so even the gateway's own refusals come as
        # events; an OpenAI stream is asked for in the body, and its refusals are plain JSON.
        sse = route != "openai" and request.headers.get("X-DashScope-SSE", "").strip().lower() == "enable"

        def refuse(status: int, code: str, message: str, outcome: str) -> _Answer:
            return _error_answer(route, sse, _ApiError(status, code, message, outcome), request_id)

        if request.headers.get("Authorization") != self._auth:
            answer = refuse(401, "InvalidApiKey", _MSG_INVALID_KEY, "auth_401")
            return await self._send(request, answer, request_id)
        if self._bucket is not None and not self._bucket.try_take(now):
            answer = refuse(429, "Throttling.RateQuota", _MSG_RATE_QUOTA, "quota_429")
            return await self._send(request, answer, request_id)

        fault = self._draw_fault()
        if fault is not None:
            refusal = _fault_error(fault, route, sse)
            if refusal is not None:
                return await self._send(request, _error_answer(route, sse, refusal, request_id), request_id)
            if fault == "fault_drop":
                self.stats.outcomes[fault] += 1
                return self._drop(request)
            if fault == "fault_hang":
                self.stats.outcomes[fault] += 1
                await self._sleep(self.config.hang_seconds)

        try:
            call = await self._prepare(request, route, sse)
        except _ApiError as error:
            answer = _error_answer(route, sse, error, request_id)
        else:
            answer = _success_answer(call, request_id)
        return await self._send(request, answer, request_id, truncate=fault == "fault_truncate")

    def _count_arrival(self, request: web.Request, route: str, now: float) -> None:
        """Count a request to a known route: its arrival, its route and its workspace."""
        stats = self.stats
        stats.requests += 1
        stats.arrivals.append(now)
        stats.routes[route] += 1
        workspace = request.headers.get("X-DashScope-WorkSpace")
        if workspace is not None:
            stats.workspaces[workspace] += 1

    async def _send(
        self, request: web.Request, answer: _Answer, request_id: str, *, truncate: bool = False
    ) -> web.StreamResponse:
        """Send ``answer`` (cut short if ``truncate``) and count it."""
        stats = self.stats
        if truncate:
            stats.outcomes["fault_truncate"] += 1
        else:
            stats.outcomes[answer.outcome] += 1
            if answer.outcome.startswith("quota"):
                stats.throttled.append(self._clock())
        delivered = not truncate
        served: list[tuple[float, int]] = []

        def serve() -> None:
            if answer.content is not None:
                stats.served[request_id] = answer.content
                served.append((self._clock(), answer.total_tokens))
                stats.answered.append(served[0])

        if answer.events is not None:
            stats.streamed += 1
            response, delivered = await self._send_events(
                request, answer.events, request_id, cut=truncate, before_last=serve
            )
            if not delivered and served:
                # The client left before the last event: not served after all (a retry will
                # be), and a test comparing a result file with ``served`` must not find it.
                stats.served.pop(request_id, None)
                stats.answered.remove(served[0])
            return response
        elif truncate:
            assert answer.payload is not None
            response = await self._send_truncated(request, answer.status, _dumps(answer.payload), request_id)
        else:
            assert answer.payload is not None
            response = _json_response(answer.status, answer.payload, request_id)
        if delivered:
            serve()
        return response

    async def _prepare(self, request: web.Request, route: str, sse: bool) -> _Call:
        """Read, validate and answer the body, in the protocol's order (checks 5 to 9)."""
        raw = await self._read_body(request)
        try:
            body = json.loads(raw)
        except ValueError:  # includes UnicodeDecodeError
            raise _bad_request("The request body is not valid JSON.") from None

        model, messages, parameters, stream, include_usage = _check_route(route, body, sse)
        _check_images(route, model, messages)
        response_format = _check_response_format(parameters.get("response_format"), messages)
        _check_streaming(route, model, parameters, stream)
        output_inspection = _check_markers(messages)

        reply = simulated_reply(
            model,
            messages,
            max_tokens=parameters.get("max_tokens"),
            enable_thinking=parameters.get("enable_thinking"),
            thinking_budget=parameters.get("thinking_budget"),
            response_format=response_format,
        )
        if self._token_bucket is not None and not self._token_bucket.try_take(
            self._clock(), reply.total_tokens
        ):
            raise _ApiError(429, "Throttling.AllocationQuota", _MSG_TOKEN_QUOTA, "quota_tpm_429")

        config = self.config
        if config.latency > 0 or config.jitter > 0:
            delay = config.latency + self._rng.uniform(-config.jitter, config.jitter)
            if delay > 0:
                await self._sleep(delay)

        return _Call(route, model, parameters, reply, stream, include_usage, output_inspection)

    @staticmethod
    async def _read_body(request: web.Request) -> bytes:
        """The body, or 413 past the gateway's limits: 64 MiB, or 16 MiB without base64 images."""
        if request.content_length is not None and request.content_length > _BODY_LIMIT:
            raise _too_large()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large() from None
        if len(raw) > _BODY_LIMIT or (len(raw) > _BODY_LIMIT_WITHOUT_BASE64 and b";base64," not in raw):
            raise _too_large()
        return raw

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        # Closing the transport before aiohttp writes anything makes its write fail with a
        # ConnectionError, which it treats as a client disconnect: nothing is sent, no log.
        if request.transport is not None:
            request.transport.close()
        response = web.Response()
        response.force_close()
        return response

    @staticmethod
    async def _send_truncated(
        request: web.Request, status: int, body: bytes, request_id: str
    ) -> web.StreamResponse:
        # The honest Content-Length followed by half the body is what a proxy cut mid-transfer
        # looks like: the client must notice the short read instead of parsing half a JSON.
        response = web.StreamResponse(status=status, headers={"x-request-id": request_id})
        response.content_type = "application/json"
        response.content_length = len(body)
        response.force_close()
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()  # flushes what was written, then closes
        return response

    @staticmethod
    async def _send_events(
        request: web.Request,
        events: list[bytes],
        request_id: str,
        *,
        cut: bool,
        before_last: Callable[[], None] = lambda: None,
    ) -> tuple[web.StreamResponse, bool]:
        """Stream ``events`` in chunked encoding, one chunk each; say whether all were written.

        ``cut`` sends about half of them (half the bytes of a lone event) and closes the
        connection without the final empty chunk: a stream that died mid-way, which a client
        must not mistake for a complete one. ``before_last`` runs just before the last event is
        written: a client may act on that event before this coroutine resumes.
        """
        response = web.StreamResponse(
            status=200, headers={"x-request-id": request_id, "Content-Type": _SSE_CONTENT_TYPE}
        )
        response.enable_chunked_encoding()
        if cut:
            response.force_close()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client went away: nothing to do
            if cut:
                if len(events) > 1:
                    for event in events[: len(events) // 2]:
                        await response.write(event)
                else:
                    await response.write(events[0][: len(events[0]) // 2])
                if request.transport is not None:
                    request.transport.close()  # flushes what was written, then closes
                return response, False
            for event in events[:-1]:
                await response.write(event)
            before_last()
            await response.write(events[-1])
            await response.write_eof()
            return response, True
        return response, False
