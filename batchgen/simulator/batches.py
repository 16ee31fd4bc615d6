"""The OpenAI-compatible Files and Batch API (:class:`BatchService`), under ``/compatible-mode/v1``.

Routes (each a "kind" counted in ``BatchStats.calls``)::

    POST   /files                upload      multipart file + purpose=batch -> the file object
    GET    /files                file_list   ?after=&limit= (1..2000, default 2000)
    GET    /files/{id}           file_retrieve
    GET    /files/{id}/content   file_content   result files (file-batch_output-...) only
    DELETE /files/{id}           file_delete
    POST   /batches              create      {input_file_id, endpoint, completion_window, metadata?}
    GET    /batches              list        ?after=&limit=&ds_name=&input_file_ids=&status=
                                             &create_after=&create_before= (yyyyMMddHHmmss, UTC)
    GET    /batches/{id}         retrieve
    POST   /batches/{id}/cancel  cancel

Each call is checked in the gateway's order: route, key (401 ``invalid_api_key``, the chat
route's), the ``batch_fault_429`` share and the account's per-minute limits (429
``limit_requests``, the chat route's throttling error), then its parameters. Every error is
OpenAI's envelope ``{"error": {"message", "type", "param", "code"}, "request_id"}``:

- 400 ``invalid_parameter_error``: a bad body, parameter, purpose, file, window or metadata;
  the content of an input file asked for; the storage full (the real "Upload file number
  exceed limit." / "Upload file capacity exceed limit.").
- 404 ``not_found``: an unknown route, file or batch (or a batch older than 30 days).
- 409, code null: cancelling a batch that is not validating or in progress (OpenAI's "Cannot
  cancel a batch with status '...'.").
- 429 ``limit_requests``: the fault share, a per-minute limit, or too many unfinished batches.

The real service's wording is used where it is known (storage, throttling, cancel); the rest
is modelled on OpenAI's and marked as a guess in the README. The generic faults, quotas and
latency of the chat routes do not apply here: the Batch API has its own (``batch_fault_*``,
:class:`BatchLimits`), and a batch line is not subject to real-time rate limits.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from batchgen.simulator.batchlines import CHAT_ENDPOINT, TEST_ENDPOINT
from batchgen.simulator.batchstate import CANCELLABLE, TERMINAL, _Batch, _Runner
from batchgen.simulator.config import SimulatorConfig, SimulatorStats
from batchgen.simulator.errors import _MSG_INVALID_KEY, _MSG_RATE_QUOTA, _ApiError, _openai_error
from batchgen.simulator.files import (
    INPUT_PREFIX,
    OUTPUT_PREFIX,
    FileStore,
    _File,
    _FileRefused,
    read_upload,
)
from batchgen.simulator.wire import _json_response

PREFIX = "/compatible-mode/v1"
FILES_PATH = PREFIX + "/files"
BATCHES_PATH = PREFIX + "/batches"

_RETENTION = 30 * 86400.0  # batches are queryable for 30 days
_WINDOW_RE = re.compile(r"([1-9][0-9]*)([hd])")
_STATUSES = frozenset({*TERMINAL, "validating", "in_progress", "finalizing", "cancelling"})
# The list filters' times; the documentation gives the format, not the zone (assumed UTC).
_FILTER_FORMAT = "%Y%m%d%H%M%S"
_MSG_RUNNING = "The number of unfinished batches has reached the limit of {}; wait for some to finish."


class _Refusal(Exception):
    """An error answer in OpenAI's envelope, raised from inside a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = "invalid_parameter_error",
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _not_found(what: str, the_id: str, param: str) -> _Refusal:
    return _Refusal(404, f"No such {what}: {the_id}", param, "not_found")


# A handler answers a JSON object (sent with HTTP 200) or a response of its own.
Reply = dict[str, Any] | web.StreamResponse
Handler = Callable[[web.Request, str, float], Awaitable[Reply]]


class BatchService:
    """The account's files and batches, served on the caller's Simulator.

    ``clock`` is the Simulator's; the batch clock is ``batch_epoch`` (else the time now) plus
    the clock's time since construction, times ``batch_speed``.
    """

    def __init__(self, config: SimulatorConfig, stats: SimulatorStats, clock: Callable[[], float]) -> None:
        self._config = config
        self._limits = config.batch_limits
        self._stats = stats.batch
        self._clock = clock
        self._clock_start = clock()
        self._epoch = time.time() if config.batch_epoch is None else config.batch_epoch
        self._rng = random.Random(config.seed)
        self._auth = f"Bearer {config.key}"
        self._files = FileStore(config.batch_limits)
        self._batches: dict[str, _Batch] = {}
        self._runner = _Runner(config, self._files, self._stats)
        self._calls: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._hung: set[str] = set()  # batch_hang_after kinds that have hung once
        self._per_minute = {
            "create": self._limits.create_per_minute,
            "retrieve": self._limits.retrieve_per_minute,
            "list": self._limits.list_per_minute,
            "cancel": self._limits.cancel_per_minute,
        }

    def now(self) -> float:
        """The simulated unix time."""
        return self._epoch + (self._clock() - self._clock_start) * self._config.batch_speed

    def _route(self, method: str, path: str) -> tuple[str, Handler, str] | None:
        """(kind, handler, id in the path) of a request, or None for an unknown route."""
        parts = path.removeprefix(PREFIX).strip("/").split("/")
        table: dict[tuple[str, str, int, str], tuple[str, Handler]] = {
            ("POST", "files", 1, ""): ("upload", self._upload),
            ("GET", "files", 1, ""): ("file_list", self._file_list),
            ("GET", "files", 2, ""): ("file_retrieve", self._file_retrieve),
            ("GET", "files", 3, "content"): ("file_content", self._file_content),
            ("DELETE", "files", 2, ""): ("file_delete", self._file_delete),
            ("POST", "batches", 1, ""): ("create", self._create),
            ("GET", "batches", 1, ""): ("list", self._list),
            ("GET", "batches", 2, ""): ("retrieve", self._retrieve),
            ("POST", "batches", 3, "cancel"): ("cancel", self._cancel),
        }
        tail = parts[2] if len(parts) == 3 else ""
        found = table.get((method, parts[0], len(parts), tail)) if len(parts) <= 3 else None
        if found is None:
            return None
        return found[0], found[1], parts[1] if len(parts) > 1 else ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one Files or Batch API call, checking in the gateway's order."""
        request_id = str(uuid.uuid4())
        route = self._route(request.method, request.path)
        if route is None:
            await _drain(request)
            return _refusal(
                _Refusal(404, f"Unknown route: {request.method} {request.path}", None, "not_found"),
                request_id,
            )
        kind, handler, the_id = route
        self._stats.calls[kind] += 1
        if request.headers.get("Authorization") != self._auth:
            await _drain(request)
            return _api_error(_ApiError(401, "InvalidApiKey", _MSG_INVALID_KEY, "auth_401"), request_id)
        if self._rng.random() < self._config.batch_fault_429 or not self._within_limit(kind):
            self._stats.throttled[kind] += 1
            await _drain(request)
            return _api_error(
                _ApiError(429, "Throttling.RateQuota", _MSG_RATE_QUOTA, "quota_429"), request_id
            )
        now = self.now()
        for batch in self._batches.values():
            self._runner.advance(batch, now)
        try:
            answer = await handler(request, the_id, now)
        except _Refusal as refusal:
            await _drain(request)
            return _refusal(refusal, request_id)
        except _FileRefused as refused:
            return _refusal(_Refusal(400, refused.message, refused.param), request_id)
        if kind in self._config.batch_hang_after and kind not in self._hung:  # a crash's moment
            self._hung.add(kind)  # the first such call only: the rerun after the crash goes through
            await asyncio.sleep(self._config.hang_seconds)
        if isinstance(answer, dict):
            return _json_response(200, answer, request_id)
        if not answer.prepared:
            answer.headers["x-request-id"] = request_id
        return answer

    def _within_limit(self, kind: str) -> bool:
        """Count a call against its per-minute limit; False if it is past it."""
        limit = self._per_minute.get(kind)
        if limit is None:
            return True
        now = self._clock()
        calls = self._calls[kind]
        while calls and calls[0] <= now - 60.0:
            calls.popleft()
        if len(calls) >= limit:
            return False
        calls.append(now)
        return True

    # --- files -------------------------------------------------------------------------------

    async def _upload(self, request: web.Request, _: str, now: float) -> Reply:
        filename, content = await read_upload(request, self._limits)
        self._files.check_room(len(content))
        file = self._files.add(INPUT_PREFIX, filename, "batch", content, int(now))
        self._stats.files_uploaded += 1
        return {**file.describe(), "status_details": None}

    async def _file_list(self, request: web.Request, _: str, now: float) -> Reply:
        limit = _int_param(request, "limit", 2000, 1, 2000)
        files = list(reversed(list(self._files)))
        after = request.query.get("after")
        if after is not None:
            ids = [file.id for file in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        page = files[:limit]
        return {"object": "list", "data": [f.describe() for f in page], "has_more": len(files) > limit}

    def _file(self, file_id: str) -> _File:
        file = self._files.get(file_id)
        if file is None:
            raise _not_found("file", file_id, "file_id")
        return file

    async def _file_retrieve(self, request: web.Request, file_id: str, now: float) -> Reply:
        return self._file(file_id).describe()

    async def _file_content(self, request: web.Request, file_id: str, now: float) -> Reply:
        file = self._file(file_id)
        if not file.id.startswith(OUTPUT_PREFIX):
            raise _Refusal(
                400,
                f"The content of file {file_id} cannot be downloaded: only result files (ids "
                f"starting with '{OUTPUT_PREFIX}') can be; input files cannot be read back.",
                "file_id",
            )
        return web.Response(body=file.content, content_type="application/octet-stream")

    async def _file_delete(self, request: web.Request, file_id: str, now: float) -> Reply:
        if not self._files.delete(file_id):
            raise _not_found("file", file_id, "file_id")
        self._stats.files_deleted += 1
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches -----------------------------------------------------------------------------

    async def _create(self, request: web.Request, _: str, now: float) -> Reply:
        body = await _json_object(request)
        input_file_id = _required_string(body, "input_file_id")
        endpoint = _required_string(body, "endpoint")
        if endpoint not in (CHAT_ENDPOINT, TEST_ENDPOINT):
            message = (
                f"Unsupported endpoint '{endpoint}': use {CHAT_ENDPOINT} "
                f"(or {TEST_ENDPOINT} for batch-test-model)."
            )
            raise _Refusal(400, message, "endpoint")
        window_text = _required_string(body, "completion_window")
        window = _window_hours(window_text)
        metadata = _metadata(body.get("metadata"))
        file = self._files.get(input_file_id)
        if file is None or file.purpose != "batch":
            raise _Refusal(
                400,
                f"The input file {input_file_id} does not exist or is not a batch input file.",
                "input_file_id",
            )
        self._check_running(endpoint)
        failing = self._config.batch_fault_create_500
        if failing and self._rng.random() < failing:  # drawn only when set: other faults keep their draws
            self._stats.failed_creates += 1
            raise _Refusal(500, "An internal error has occurred, please try again later.", None,
                           "internal_error", "server_error")  # fmt: skip
        batch = _Batch(
            id=f"batch_{uuid.uuid4()}",
            seq=len(self._batches),
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=window_text,
            window=window * 3600.0,
            metadata=metadata,
            content=file.content,
            created=now,
        )
        self._batches[batch.id] = batch
        self._stats.created.append(batch.id)
        if self._rng.random() < self._config.batch_fault_lost_create:
            self._stats.lost_creates.append(batch.id)
            return _drop(request)
        return batch.describe()

    def _check_running(self, endpoint: str) -> None:
        """429 past the account's unfinished batches (two for the free test model)."""
        unfinished = [b for b in self._batches.values() if b.status not in TERMINAL]
        if len(unfinished) >= self._limits.running:
            raise _Refusal(
                429, _MSG_RUNNING.format(self._limits.running), None, "limit_requests", "limit_requests"
            )
        tests = [b for b in unfinished if b.endpoint == TEST_ENDPOINT]
        if endpoint == TEST_ENDPOINT and len(tests) >= self._limits.test_running:
            message = _MSG_RUNNING.format(self._limits.test_running).replace(
                "batches", "batch-test-model batches"
            )
            raise _Refusal(429, message, None, "limit_requests", "limit_requests")

    def _batch(self, batch_id: str, now: float) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None or now - batch.created >= _RETENTION:
            raise _not_found("batch", batch_id, "batch_id")
        return batch

    async def _retrieve(self, request: web.Request, batch_id: str, now: float) -> Reply:
        return self._batch(batch_id, now).describe()

    async def _cancel(self, request: web.Request, batch_id: str, now: float) -> Reply:
        batch = self._batch(batch_id, now)
        if batch.status not in CANCELLABLE:
            raise _Refusal(409, f"Cannot cancel a batch with status '{batch.status}'.", None, None)
        batch.cancel_at = now
        batch.status = "cancelling"
        return batch.describe()

    async def _list(self, request: web.Request, _: str, now: float) -> Reply:
        query = request.query
        limit = _int_param(request, "limit", 20, 1, 100)
        keep = _list_filter(query)
        batches = [
            b
            for b in sorted(self._batches.values(), key=lambda b: b.seq, reverse=True)
            if now - b.created < _RETENTION and keep(b)
        ]
        after = query.get("after")
        if after is not None:
            cursor = self._batches.get(after)
            batches = [b for b in batches if b.seq < cursor.seq] if cursor is not None else []
        page = batches[:limit]
        return {
            "object": "list",
            "data": [b.describe() for b in page] or None,  # the real empty list says null
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(batches) > limit,
        }


def _list_filter(query: Any) -> Callable[[_Batch], bool]:
    """The list's filters as one predicate: ds_name (a substring, as documented), input_file_ids
    (up to 20), status (comma-separated), create_after / create_before (inclusive)."""
    name = query.get("ds_name")
    file_ids = _csv(query.get("input_file_ids"))
    if file_ids is not None and len(file_ids) > 20:
        raise _Refusal(400, "At most 20 input_file_ids can be given.", "input_file_ids")
    statuses = _csv(query.get("status"))
    if statuses is not None and not statuses <= _STATUSES:
        unknown = ", ".join(sorted(statuses - _STATUSES))
        raise _Refusal(
            400, f"Unknown status: {unknown}; expected some of {', '.join(sorted(_STATUSES))}.", "status"
        )
    after, before = _filter_time(query, "create_after"), _filter_time(query, "create_before")

    def keep(batch: _Batch) -> bool:
        return (
            (name is None or name in batch.metadata.get("ds_name", ""))
            and (file_ids is None or batch.input_file_id in file_ids)
            and (statuses is None or batch.status in statuses)
            and (after is None or batch.created >= after)
            and (before is None or batch.created <= before)
        )

    return keep


def _csv(value: str | None) -> set[str] | None:
    return None if value is None else {item.strip() for item in value.split(",") if item.strip()}


def _filter_time(query: Any, name: str) -> float | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        parsed = datetime.datetime.strptime(value, _FILTER_FORMAT).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise _Refusal(
            400, f"Parameter {name} should be a time as yyyyMMddHHmmss, e.g. 20250304123000.", name
        ) from None
    return parsed.timestamp()


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]+", value) or not low <= int(value) <= high:
        raise _Refusal(400, f"Parameter {name} should be an integer in [{low}, {high}].", name)
    return int(value)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError:  # includes UnicodeDecodeError
        raise _Refusal(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _Refusal(400, "The request body should be a JSON object.")
    return body


def _required_string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _Refusal(400, f"Missing required parameter: '{name}'.", name)
    return value


def _window_hours(text: str) -> int:
    """The hours of a completion window: "24h".."336h" or "1d".."14d", whole numbers."""
    match = _WINDOW_RE.fullmatch(text)
    hours = None if match is None else int(match[1]) * (24 if match[2] == "d" else 1)
    if hours is None or not 24 <= hours <= 336:
        raise _Refusal(
            400,
            f"Invalid completion_window '{text}': a whole number of hours from 24h to 336h, or of days "
            "from 1d to 14d.",
            "completion_window",
        )
    return hours


def _metadata(value: Any) -> dict[str, str]:
    """The batch's metadata: string values; ds_name at most 100 characters, ds_description 200."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Refusal(400, "Parameter metadata should be an object of string values.", "metadata")
    for key, most in (("ds_name", 100), ("ds_description", 200)):
        if len(value.get(key, "")) > most:
            raise _Refusal(400, f"metadata.{key} may be at most {most} characters.", f"metadata.{key}")
    return dict(value)


def _refusal(refusal: _Refusal, request_id: str) -> web.Response:
    error = {"message": refusal.message, "type": refusal.kind, "param": refusal.param, "code": refusal.code}
    return _json_response(refusal.status, {"error": error, "request_id": request_id}, request_id)


def _api_error(error: _ApiError, request_id: str) -> web.Response:
    """One of the chat route's errors (the key's, the throttling's) in its exact words."""
    status, payload = _openai_error(error, request_id)
    return _json_response(status, payload, request_id)


async def _drain(request: web.Request) -> None:
    # A refused upload's body is read to its end, so the client gets the answer rather than a
    # connection reset while it is still sending.
    while await request.content.readany():
        pass


def _drop(request: web.Request) -> web.StreamResponse:
    # As server.Simulator._drop: close before anything is written, so nothing is sent.
    if request.transport is not None:
        request.transport.close()
    response = web.Response()
    response.force_close()
    return response
