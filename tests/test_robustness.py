"""What the reviewers broke: odd tables, odd servers, odd keys. Each must cost no answers."""

from __future__ import annotations

import asyncio
import json
import os
import socketserver
import stat
import threading
import typing
from collections.abc import Iterator

import polars as pl
import pytest
from conftest import KEY, invoke, write_prompts

from batchgen import cli as cli_module
from batchgen.config import RunConfig
from batchgen.runner import arun
from batchgen.simulator import simulated_reply


def test_nested_and_binary_columns_are_written_to_csv_as_text(simulator, tmp_path):
    sim = simulator()
    source = tmp_path / "in.parquet"
    pl.DataFrame(
        {
            "prompt": ["a", "b"],
            "tags": [["x", "y"], None],
            "meta": [{"n": 1}, {"n": 2}],
            "blob": [b"\x00\x01", b"hi"],
        }
    ).write_parquet(source)

    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv")], sim)

    assert result.exit_code == 0, result.stderr
    frame = pl.read_csv(tmp_path / "o.csv")
    assert frame["tags"].to_list() == ['["x", "y"]', None]
    assert frame["meta"].to_list() == ['{"n":1}', '{"n":2}']
    assert frame["blob"].to_list() == ["AAE=", "aGk="]
    assert set(frame["status"]) == {"ok"}


def test_output_keeps_the_existing_files_permissions(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a"])
    out = tmp_path / "o.csv"
    assert invoke(["run", str(source), "-o", str(out)], sim).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    out.chmod(0o640)
    assert invoke(["run", str(source), "-o", str(out), "--fresh"], sim).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


class _GarbageHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}")


@pytest.fixture
def garbage_server() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _GarbageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    server.shutdown()
    server.server_close()


def test_a_server_speaking_broken_http_costs_no_traceback(garbage_server, tmp_path):
    source = write_prompts(tmp_path / "in.csv", [f"p{i}" for i in range(8)])
    out = tmp_path / "o.csv"

    result = invoke(
        [
            "run",
            str(source),
            "-o",
            str(out),
            "--base-url",
            garbage_server,
            "--max-attempts",
            "2",
            "--rpm",
            "60000",
            "-c",
            "2",
        ]
    )

    assert "Traceback" not in result.stderr
    assert result.exit_code == 1
    assert "batchgen.Unreachable" in result.stderr and "--base-url" in result.stderr
    frame = pl.read_csv(out)
    assert frame.height == 8 and set(frame["status"]) <= {"error", "skipped"}
    assert "ClientResponseError" in frame["error_message"][0] or "Content-Length" in frame["error_message"][0]


def test_an_unreachable_service_stops_the_run_and_keeps_the_old_output(tmp_path):
    source = write_prompts(tmp_path / "in.csv", [f"p{i}" for i in range(20)])
    out = tmp_path / "o.csv"
    out.write_text("yesterday\n")

    result = invoke(
        [
            "run",
            str(source),
            "-o",
            str(out),
            "--base-url",
            "http://127.0.0.1:9/api/v1",
            "--max-attempts",
            "1",
            "--rpm",
            "60000",
        ]
    )

    assert result.exit_code == 1
    assert "5 rows in a row got no answer from http://127.0.0.1:9/api/v1" in result.stderr
    assert out.read_text() == "yesterday\n"
    assert len(list(tmp_path.glob("o.partial-*.csv"))) == 1


def test_a_fatal_answer_stops_waiting_rows_at_once_even_at_low_rpm(simulator, tmp_path):
    sim = simulator()
    released = []

    async def never(seconds: float) -> None:  # a pacing slot that only an interrupt ends
        released.append(seconds)
        await asyncio.Event().wait()

    frame = pl.DataFrame({"prompt": [f"p{i}" for i in range(16)]})
    config = RunConfig(api_key="sk-wrong-key", base_url=sim.base_url, rpm=6, concurrency=8)
    # Rows waiting for a slot are released by the fatal answer, not by time: were they not,
    # this run would never end (the timeout is a hang guard, not a measure of speed).
    result = asyncio.run(asyncio.wait_for(arun(frame, config, sleep=never), timeout=60))

    assert result.fatal is not None and result.fatal.code == "InvalidApiKey"
    assert released  # rows did wait for pacing slots, and were let go
    assert result.frame["status"].to_list() == ["error"] + ["skipped"] * 15
    assert sim.stats.requests == 1


@pytest.mark.parametrize(
    "key", ["sk-abc\u201d", "sk-abc\ndef", "sk abc"], ids=["curly-quote", "newline", "space"]
)
def test_a_mangled_key_is_refused_before_sending(simulator, tmp_path, key):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv")], sim, key=key)
    assert result.exit_code == 2
    assert "DASHSCOPE_API_KEY holds characters no API key has" in result.stderr
    assert "abc" not in result.stderr and "Traceback" not in result.stderr
    assert sim.stats.requests == 0


def test_a_list_prompt_column_is_a_usage_error(simulator, tmp_path):
    source = tmp_path / "in.parquet"
    pl.DataFrame({"prompt": [["a", "b"]]}).write_parquet(source)
    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv")], simulator())
    assert result.exit_code == 2
    assert "column 'prompt' holds List(String), not text" in result.stderr


def test_a_template_with_a_nested_field_is_a_usage_error(simulator, tmp_path):
    source = write_prompts(tmp_path / "in.csv", ["a"])
    result = invoke(
        ["run", str(source), "-o", str(tmp_path / "o.csv"), "--template", "{prompt:{w}}"], simulator()
    )
    assert result.exit_code == 2 and "cannot be filled from row 0" in result.stderr


def test_jsonl_conversations_are_sent_exactly_as_written(simulator, tmp_path):
    sim = simulator()
    rows = [
        {"conv": [{"role": "user", "content": "Describe it."}]},
        {"conv": [{"role": "user", "content": [{"text": "Hi"}], "name": "ann"}]},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = invoke(
        [
            "run",
            str(source),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--messages-column",
            "conv",
            "-m",
            "qwen3.6-plus",
        ],
        sim,
    )

    assert result.exit_code == 0, result.stderr
    replies = pl.read_ndjson(tmp_path / "o.jsonl")["reply"].to_list()
    assert (
        replies[0]
        == simulated_reply("qwen3.6-plus", [{"role": "user", "content": [{"text": "Describe it."}]}]).content
    )
    assert replies[1] == simulated_reply("qwen3.6-plus", rows[1]["conv"]).content


def test_parquet_conversations_lose_their_null_fields(simulator, tmp_path):
    sim = simulator()
    source = tmp_path / "in.parquet"
    pl.DataFrame({"conv": [[{"role": "user", "content": "Hi", "name": None}]]}).write_parquet(source)
    result = invoke(["run", str(source), "-o", str(tmp_path / "o.csv"), "--messages-column", "conv"], sim)
    assert result.exit_code == 0, result.stderr
    assert (
        pl.read_csv(tmp_path / "o.csv")["reply"][0]
        == simulated_reply("qwen-plus", [{"role": "user", "content": "Hi"}]).content
    )


def test_ctrl_c_outside_the_run_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module.cli, "main", interrupted)
    with pytest.raises(SystemExit) as caught:
        cli_module.main()
    assert caught.value.code == 130
    assert capsys.readouterr().err == "batchgen: interrupted\n"


def test_key_not_in_any_output_file(simulator, tmp_path):
    sim = simulator(fault_500=0.3, seed=1)
    source = write_prompts(tmp_path / "in.csv", ["a", "b", "c"])
    out = tmp_path / "o.parquet"
    summary = tmp_path / "s.json"
    result = invoke(
        ["run", str(source), "-o", str(out), "--summary", str(summary), "--log-format", "json"], sim
    )
    assert result.exit_code == 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in result.stderr and KEY not in result.stdout


class _ProxyHandler(socketserver.BaseRequestHandler):
    seen: typing.ClassVar[list[bytes]] = []

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.request.recv(65536)
        _ProxyHandler.seen.append(data.split(b"\r\n", 1)[0])
        body = (
            b'{"output":{"choices":[{"finish_reason":"stop","message":{"role":"assistant",'
            b'"content":"via proxy"}}]},"usage":{"input_tokens":3,"output_tokens":2,'
            b'"total_tokens":5},"request_id":"p1"}'
        )
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )


def test_http_proxy_from_the_environment_is_used(tmp_path, monkeypatch):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ProxyHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
        source = write_prompts(tmp_path / "in.csv", ["a"])
        result = invoke(
            [
                "run",
                str(source),
                "-o",
                str(tmp_path / "o.csv"),
                "--base-url",
                "http://dashscope.invalid/api/v1",
            ]
        )
        assert result.exit_code == 0, result.stderr
        assert pl.read_csv(tmp_path / "o.csv")["reply"][0] == "via proxy"
        assert _ProxyHandler.seen == [
            b"POST http://dashscope.invalid/api/v1/services/aigc/text-generation/generation HTTP/1.1"
        ]
    finally:
        server.shutdown()
        server.server_close()
