"""Real DashScope response bodies, replayed from a local server through ``batchgen run``.

``data/realbodies.json`` is a copy of the recorded bodies (see its README in the shared
``realbodies`` folder): each entry's body is served exactly as recorded, framed as its ``framing``
says, and the output row must hold what ``expect`` lists.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from aiohttp import web
from click.testing import CliRunner
from conftest import KEY

from batchgen.cli import cli

DATA = Path(__file__).parent / "data" / "realbodies.json"
BODIES = json.loads(DATA.read_text(encoding="utf-8"))["bodies"]
ROUTES = (
    "/api/v1/services/aigc/text-generation/generation",
    "/api/v1/services/aigc/multimodal-generation/generation",
    "/compatible-mode/v1/chat/completions",
)
COLUMNS = {
    "reply",
    "reasoning",
    "finish_reason",
    "request_id",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "status",
    "error_code",
    "http_status",
    "attempts",
}
NOT_COLUMNS = {"error_message_contains", "exit_code"}


def frame(entry: dict[str, Any]) -> list[bytes]:
    """The body as the HTTP chunks the replay server sends, per the entry's ``framing``."""
    body, framing = entry["body"], entry["framing"]
    if framing == "raw":
        chunks = [body]
    elif framing == "strip-bom":
        chunks = [body.removeprefix("\ufeff")]
    elif framing == "sse-blank-lines":  # each event, from its ``id:`` line, then one blank line
        events = re.split(r"(?m)^(?=id:)", body.lstrip("\ufeff"))
        chunks = [event.strip("\n") + "\n\n" for event in events if event.strip()]
    elif framing == "openai-chunk-lines":
        chunks = [f"data: {line}\n\n" for line in body.splitlines() if line.strip()] + ["data: [DONE]\n\n"]
    else:
        raise AssertionError(f"unknown framing {framing!r}")
    return [chunk.encode() for chunk in chunks]


class ReplayServer:
    """An aiohttp app in a background thread answering every POST with ``self.entry``."""

    def __init__(self) -> None:
        self.entry: dict[str, Any] = {}
        self.requests: list[str] = []
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests.append(request.path)
        entry = self.entry
        sse = entry["framing"] in ("sse-blank-lines", "openai-chunk-lines")
        headers = {"Content-Type": "text/event-stream" if sse else "application/json"}
        for name, value in entry["headers"].items():
            headers["Content-Type" if name.lower() == "content-type" else name] = value
        chunks = frame(entry)
        if not sse:
            return web.Response(status=entry["http_status"], body=chunks[0], headers=headers)
        response = web.StreamResponse(status=entry["http_status"], headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _start(self) -> None:
        app = web.Application()
        for route in ROUTES:
            app.router.add_post(route, self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ReplayServer]:
    replay = ReplayServer()
    replay.start()
    yield replay
    replay.stop()


def run_against(
    server: ReplayServer, entry: dict[str, Any], tmp_path: Path
) -> tuple[int, dict[str, Any], str]:
    """Run ``batchgen run`` on one prompt against the replay server: (exit code, output row, stderr)."""
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    pl.DataFrame({"prompt": ["hello"]}).write_csv(source)
    base = f"http://127.0.0.1:{server.port}"
    args = ["run", str(source), "-o", str(out), "--max-attempts", "1", "--rpm", "6000", "-q"]
    args.append("--stream" if entry["stream"] else "--no-stream")
    if entry["api"] == "openai":
        args += ["--api", "openai", "--base-url", f"{base}/compatible-mode/v1", "-m", "qwen-plus"]
        env = {"OPENAI_API_KEY": KEY}
    else:
        model = "qwen3-vl-plus" if entry["route"] == "multimodal" else "qwen-plus"
        args += ["--base-url", f"{base}/api/v1", "--endpoint", entry["route"], "-m", model]
        env = {"DASHSCOPE_API_KEY": KEY}
    server.entry, server.requests = entry, []
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    assert out.exists(), f"no output written (exit {result.exit_code}): {result.stderr}"
    rows = pl.read_parquet(out).to_dicts()
    assert len(rows) == 1, rows
    return result.exit_code, rows[0], result.stderr


def mismatches(expect: dict[str, Any], row: dict[str, Any], exit_code: int) -> list[str]:
    """Every way the output row and exit code differ from ``expect``, one line each."""
    unknown = set(expect) - COLUMNS - NOT_COLUMNS
    problems = [f"expect has unknown keys {sorted(unknown)}"] if unknown else []
    for column in sorted(COLUMNS & set(expect)):
        wanted, got = expect[column], row.get(column)
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if column not in row:
            problems.append(f"{column}: column missing from the output")
        elif not any(got == value and (got is None) == (value is None) for value in allowed):
            problems.append(f"{column}: expected {wanted!r}, got {got!r}")
    if "error_message_contains" in expect:
        needle, message = expect["error_message_contains"], row.get("error_message")
        if message is None or needle not in message:
            problems.append(f"error_message: expected to contain {needle!r}, got {message!r}")
    wanted_exit = expect.get("exit_code", 0 if expect.get("status") == "ok" else 3)
    if exit_code != wanted_exit:
        problems.append(f"exit_code: expected {wanted_exit}, got {exit_code}")
    return problems


@pytest.mark.parametrize("entry", BODIES, ids=[entry["id"] for entry in BODIES])
def test_real_body(server: ReplayServer, entry: dict[str, Any], tmp_path: Path) -> None:
    exit_code, row, stderr = run_against(server, entry, tmp_path)
    assert server.requests, "batchgen sent nothing to the replay server"
    problems = mismatches(entry["expect"], row, exit_code)
    assert not problems, f"{entry['id']} ({entry['notes'] or 'no notes'}):\n  " + "\n  ".join(
        [*problems, f"stderr: {stderr.strip()!r}"]
    )
