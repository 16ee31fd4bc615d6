"""Streaming, thinking, images, JSON replies and the OpenAI-compatible API, end to end.

Every test runs ``batchgen run`` against the simulator over real loopback sockets.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import polars as pl
import pytest
from conftest import KEY, invoke, write_prompts

from batchgen.simulator import image_id, simulated_reply

PROMPTS = [f"Question {i}: what is {i} squared, and why?" for i in range(24)]
FAST = ["--rpm", "60000", "-c", "8"]
# Columns that differ between two runs of the same rows by nature.
VOLATILE = ["request_id", "latency_ms", "finished_at", "attempts"]
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def run(sim, source: Path, out: Path, *args: str, key: str | None = KEY):
    return invoke(["run", str(source), "-o", str(out), *FAST, *args], sim, key=key)


@pytest.mark.parametrize(
    "thinking", [[], ["--enable-thinking", "--thinking-budget", "40"]], ids=["plain", "thinking"]
)
def test_streamed_and_unstreamed_runs_give_the_same_table(simulator, tmp_path, thinking):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS)
    plain, streamed = tmp_path / "plain.parquet", tmp_path / "streamed.parquet"

    assert run(sim, source, plain, "--no-stream", *thinking).exit_code == 0
    assert sim.stats.streamed == 0
    assert run(sim, source, streamed, "--stream", *thinking).exit_code == 0
    assert sim.stats.streamed == len(PROMPTS)

    a, b = pl.read_parquet(plain), pl.read_parquet(streamed)
    assert a.drop(VOLATILE).equals(b.drop(VOLATILE))
    assert b["status"].unique().to_list() == ["ok"]
    assert (b["reasoning"].null_count() == 0) is bool(thinking)
    for row in b.iter_rows(named=True):
        assert sim.stats.served[row["request_id"]] == row["reply"]


def test_switching_to_streaming_does_not_send_answered_rows_again(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS)
    out = tmp_path / "out.csv"
    assert run(sim, source, out, "--no-stream").exit_code == 0
    sent = sim.stats.requests
    result = run(sim, source, out, "--stream")
    assert result.exit_code == 0, result.stderr
    assert sim.stats.requests == sent


def test_a_streamed_429_under_http_200_is_retried(simulator, tmp_path):
    sim = simulator(fault_429=0.3, fault_500=0.1, fault_200_error=0.1, seed=3)
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:12])
    out = tmp_path / "out.parquet"

    result = run(sim, source, out, "--stream")

    assert result.exit_code == 0, result.stderr
    frame = pl.read_parquet(out)
    assert frame["status"].unique().to_list() == ["ok"]
    faults = sum(n for k, n in sim.stats.outcomes.items() if k.startswith("fault_"))
    assert sim.stats.outcomes["fault_429"] >= 3
    assert sim.stats.streamed == sim.stats.requests  # errors too came as SSE under HTTP 200
    assert frame["attempts"].sum() == 12 + faults

    # The streamed 429s slow the run down like any 429 (the library shows the governor).
    from batchgen import RunConfig
    from batchgen import run as run_library

    sim = simulator(fault_429=0.2, seed=1)
    config = RunConfig(api_key=KEY, base_url=sim.base_url, stream=True, rpm=60000)
    answered = run_library(pl.DataFrame({"prompt": PROMPTS[:12]}), config)
    assert answered.stats.ok == 12
    assert answered.stats.governor.throttles["requests"] == sim.stats.outcomes["fault_429"] > 0


def test_a_cut_stream_is_sent_again_and_counted(simulator, tmp_path):
    sim = simulator(fault_truncate=0.35, seed=11)
    source = write_prompts(tmp_path / "in.csv", PROMPTS)
    out = tmp_path / "out.parquet"

    result = run(sim, source, out, "--stream")

    assert result.exit_code == 0, result.stderr
    frame = pl.read_parquet(out)
    cuts = sim.stats.outcomes["fault_truncate"]
    assert cuts >= 3
    assert frame["status"].unique().to_list() == ["ok"]
    assert frame["attempts"].sum() == len(PROMPTS) + cuts
    for row in frame.iter_rows(named=True):  # the retried rows hold the whole answer
        expected = simulated_reply("qwen-plus", [{"role": "user", "content": row["prompt"]}])
        assert (row["reply"], row["output_tokens"]) == (expected.content, expected.output_tokens)


def test_cut_streams_that_never_finish_end_as_row_errors(simulator, tmp_path):
    sim = simulator(fault_truncate=1.0)
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:2])
    out = tmp_path / "out.csv"
    result = run(sim, source, out, "--stream", "--max-attempts", "2")
    assert result.exit_code == 3
    frame = pl.read_csv(out)
    assert frame["error_code"].unique().to_list() == ["batchgen.StreamCut"]
    assert frame["attempts"].to_list() == [2, 2]


def test_thinking_only_models_are_streamed_by_themselves(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:6])
    out = tmp_path / "out.csv"

    result = run(sim, source, out, "-m", "qwq-plus")

    assert result.exit_code == 0, result.stderr
    assert sim.stats.streamed == 6
    frame = pl.read_csv(out)
    assert frame["reasoning"].null_count() == 0
    assert (frame["reasoning_tokens"] > 0).all()
    expected = simulated_reply("qwq-plus", [{"role": "user", "content": PROMPTS[0]}])
    assert frame["reasoning"][0] == expected.reasoning


def test_thinking_is_streamed_by_default(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    assert run(sim, source, tmp_path / "a.csv", "--enable-thinking").exit_code == 0
    assert sim.stats.streamed == 3
    assert run(sim, source, tmp_path / "b.csv", "--disable-thinking").exit_code == 0
    assert sim.stats.streamed == 3  # not thinking: plain calls


def test_no_stream_on_a_stream_only_model_stops_with_the_fix(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    result = run(sim, source, tmp_path / "out.csv", "-m", "qwen3-8b", "--no-stream")
    assert result.exit_code == 1
    assert "non-streaming calls" in result.stderr and "--no-stream" in result.stderr
    result = run(sim, source, tmp_path / "qwq.csv", "-m", "qwq-plus", "--no-stream")
    assert result.exit_code == 1 and "only support stream" in result.stderr
    # ... and thinking off is answered unstreamed.
    result = run(sim, source, tmp_path / "off.csv", "-m", "qwen3-8b", "--disable-thinking")
    assert result.exit_code == 0, result.stderr


# --- images ------------------------------------------------------------------------------


def test_image_rows_with_urls_and_local_files(simulator, tmp_path, monkeypatch):
    sim = simulator()
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "cat.png").write_bytes(PNG)
    url = "https://example.com/dog.jpg"
    source = write_prompts(
        data / "in.csv",
        ["What is this?"] * 5,
        photo=[url, "img/cat.png", json.dumps([url, "img/cat.png"]), "img/missing.png", None],
    )
    out = tmp_path / "out.csv"
    monkeypatch.chdir(tmp_path)  # relative paths are read from the table's folder, not here

    result = run(sim, source, out, "-m", "qwen-vl-max", "--image-column", "photo")

    assert result.exit_code == 3, result.stderr  # the missing file
    frame = pl.read_csv(out)
    assert frame["status"].to_list() == ["ok", "ok", "ok", "error", "ok"]
    cat = image_id("data:image/png;base64," + base64.b64encode(PNG).decode())
    assert image_id(url) in frame["reply"][0] and cat not in frame["reply"][0]
    assert cat in frame["reply"][1]
    assert image_id(url) in frame["reply"][2] and cat in frame["reply"][2]
    assert "image" not in frame["reply"][4]
    assert frame["error_code"][3] == "batchgen.ImageNotFound"
    assert frame["attempts"][3] == 0
    assert frame["input_tokens"][2] > frame["input_tokens"][0] > frame["input_tokens"][4]
    assert sim.stats.requests == 4


def test_image_list_column_from_parquet_and_the_openai_api(simulator, tmp_path):
    sim = simulator()
    (tmp_path / "a.png").write_bytes(PNG)
    source = tmp_path / "in.parquet"
    pl.DataFrame(
        {"prompt": ["Describe", "Compare"], "images": [["a.png"], ["a.png", "https://example.com/b.png"]]}
    ).write_parquet(source)
    native, openai = tmp_path / "native.parquet", tmp_path / "openai.parquet"

    assert run(sim, source, native, "-m", "qwen3-vl-plus", "--image-column", "images").exit_code == 0
    result = run(sim, source, openai, "-m", "qwen3-vl-plus", "--image-column", "images", "--api", "openai")
    assert result.exit_code == 0, result.stderr
    a, b = pl.read_parquet(native), pl.read_parquet(openai)
    assert a["reply"].to_list() == b["reply"].to_list()
    assert a["input_tokens"].to_list() == b["input_tokens"].to_list()
    assert sim.stats.routes["openai"] == 2


def test_a_text_model_with_images_is_refused_before_sending(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["x"], photo=["https://example.com/a.png"])
    result = run(sim, source, tmp_path / "out.csv", "--image-column", "photo")
    assert result.exit_code == 2
    assert "reads no images" in result.stderr and sim.stats.requests == 0


def test_an_image_too_large_for_the_gateway_is_a_row_error(simulator, tmp_path):
    sim = simulator()
    (tmp_path / "huge.png").write_bytes(PNG + b"\0" * (49 * 2**20))  # 65+ MiB once base64-encoded
    (tmp_path / "ok.png").write_bytes(PNG)
    source = write_prompts(tmp_path / "in.csv", ["a", "b"], photo=["huge.png", "ok.png"])
    out = tmp_path / "out.csv"
    result = run(sim, source, out, "-m", "qwen-vl-max", "--image-column", "photo")
    assert result.exit_code == 3
    frame = pl.read_csv(out)
    assert frame["status"].to_list() == ["error", "ok"]
    assert frame["error_code"][0] == "batchgen.TooLarge" and frame["attempts"][0] == 0
    assert sim.stats.requests == 1


# --- JSON replies ------------------------------------------------------------------------


def test_json_mode_fills_reply_json_valid(simulator, tmp_path):
    sim = simulator()
    prompts = [
        "Give json for the weather",
        "json please [sim:BadJson]",
        "no magic word",
        "json about a long story",
    ]
    source = write_prompts(tmp_path / "in.csv", prompts)
    out = tmp_path / "out.csv"

    result = run(sim, source, out, "--json")

    assert result.exit_code == 3  # the row without "json" is an error, never sent
    frame = pl.read_csv(out)
    assert frame["status"].to_list() == ["ok", "ok", "error", "ok"]
    assert frame["reply_json_valid"].to_list() == [True, False, None, True]
    assert frame["error_code"][2] == "batchgen.NoJsonWord"
    assert isinstance(json.loads(frame["reply"][0]), dict)
    assert sim.stats.requests == 3

    cut = tmp_path / "cut.csv"
    assert run(sim, source, cut, "--json", "--max-tokens", "5", "--limit", "1").exit_code == 0
    row = pl.read_csv(cut).row(0, named=True)
    assert (row["finish_reason"], row["reply_json_valid"]) == ("length", False)


def test_json_mode_without_json_in_any_prompt_is_refused_up_front(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["hello", "there"])
    result = run(sim, source, tmp_path / "out.csv", "--json")
    assert result.exit_code == 2 and '"json"' in result.stderr
    assert run(sim, source, tmp_path / "out.csv", "--json", "--system", "Reply in JSON.").exit_code == 0


def test_json_schema_replies_match_the_schema(simulator, tmp_path):
    sim = simulator()
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
        "required": ["sentiment", "score", "tags"],
        "additionalProperties": False,
    }
    (tmp_path / "sentiment.json").write_text(json.dumps(schema))
    source = write_prompts(tmp_path / "in.jsonl", [f"Review {i}: great value" for i in range(5)])
    out = tmp_path / "out.jsonl"

    result = run(sim, source, out, "--json-schema", str(tmp_path / "sentiment.json"))

    assert result.exit_code == 0, result.stderr
    frame = pl.read_ndjson(out)
    assert frame["reply_json_valid"].to_list() == [True] * 5
    for reply in frame["reply"]:
        assert json.loads(reply)["sentiment"] in ("positive", "negative", "neutral")


def test_a_bad_schema_file_is_refused(simulator, tmp_path):
    (tmp_path / "s.json").write_text('{"type": 12}')
    source = write_prompts(tmp_path / "in.csv", ["x"])
    result = run(simulator(), source, tmp_path / "out.csv", "--json-schema", str(tmp_path / "s.json"))
    assert result.exit_code == 2 and "not a valid JSON Schema" in result.stderr
    assert "Traceback" not in result.stderr


# --- the OpenAI-compatible API -----------------------------------------------------------


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_openai_route_end_to_end_gives_the_native_table(simulator, tmp_path, stream):
    sim = simulator(fault_429=0.1, fault_500=0.1, seed=5)
    source = write_prompts(tmp_path / "in.csv", PROMPTS)
    native, openai = tmp_path / "native.parquet", tmp_path / "openai.parquet"

    assert run(sim, source, native).exit_code == 0
    result = run(sim, source, openai, "--api", "openai", stream)

    assert result.exit_code == 0, result.stderr
    assert sim.stats.routes["openai"] >= len(PROMPTS)
    a, b = pl.read_parquet(native), pl.read_parquet(openai)
    assert a.drop(VOLATILE).equals(b.drop(VOLATILE))
    for row in b.iter_rows(named=True):
        assert sim.stats.served[row["request_id"]] == row["reply"]


def test_openai_route_with_thinking_fills_reasoning(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:4])
    out = tmp_path / "out.csv"
    result = run(sim, source, out, "--api", "openai", "-m", "qwq-plus")
    assert result.exit_code == 0, result.stderr
    frame = pl.read_csv(out)
    assert frame["reasoning"].null_count() == 0 and (frame["reasoning_tokens"] > 0).all()
    assert sim.stats.streamed == 4


def test_openai_route_bad_key_stops_with_the_fix(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    result = run(sim, source, tmp_path / "out.csv", "--api", "openai", key="sk-wrong")
    assert result.exit_code == 1
    assert "invalid_api_key" in result.stderr and "sk-wrong" not in result.stderr


def test_openai_key_and_base_url_variables(simulator, tmp_path):
    from click.testing import CliRunner

    from batchgen.cli import cli

    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:2])
    base = sim.base_url.replace("/api/v1", "/compatible-mode/v1")
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": base}
    result = CliRunner().invoke(
        cli, ["run", str(source), "-o", str(tmp_path / "o.csv"), "--api", "openai"], env=env
    )
    assert result.exit_code == 0, result.stderr
    assert sim.stats.routes["openai"] == 2
    # The native API ignores both: no key.
    result = CliRunner().invoke(cli, ["run", str(source), "-o", str(tmp_path / "p.csv")], env=env)
    assert result.exit_code == 2 and "DASHSCOPE_API_KEY" in result.stderr


def test_simulate_with_the_openai_api(tmp_path):
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    result = invoke(
        ["run", str(source), "-o", str(tmp_path / "o.csv"), "--simulate", "--api", "openai"], key=None
    )
    assert result.exit_code == 0, result.stderr
    assert pl.read_csv(tmp_path / "o.csv")["status"].to_list() == ["ok"] * 3


def test_the_dashscope_key_never_goes_to_another_server(simulator, tmp_path):
    from click.testing import CliRunner

    from batchgen.cli import cli

    sim = simulator()  # stands in for a vLLM server that accepts KEY
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:2])
    other = sim.base_url.replace("/api/v1", "/compatible-mode/v1")
    args = ["run", str(source), "-o", str(tmp_path / "o.csv"), "--api", "openai", "--base-url", other]
    secret = {"DASHSCOPE_API_KEY": "sk-dashscope-secret", "DASHSCOPE_WORKSPACE_ID": "ws-1"}

    refused = CliRunner().invoke(cli, args, env=secret)
    assert refused.exit_code == 2 and "OPENAI_API_KEY" in refused.stderr
    assert sim.stats.requests == 0

    result = CliRunner().invoke(cli, args, env={**secret, "OPENAI_API_KEY": KEY})
    assert result.exit_code == 0, result.stderr  # the simulator accepts KEY only
    assert sim.stats.routes["openai"] == 2
    assert not sim.stats.workspaces  # nor the DashScope workspace


def test_resumed_json_rows_are_checked_against_todays_schema(simulator, tmp_path):
    sim = simulator()
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["prompt"]}))
    source = write_prompts(tmp_path / "in.csv", ["json please", "more json"])
    out = tmp_path / "out.csv"
    # QwQ takes no schema: JSON mode is sent, so the schema is not part of the request.
    assert run(sim, source, out, "-m", "qwq-plus", "--json-schema", str(schema)).exit_code == 0
    assert pl.read_csv(out)["reply_json_valid"].to_list() == [True, True]
    sent = sim.stats.requests

    schema.write_text(json.dumps({"type": "object", "required": ["nope"]}))
    assert run(sim, source, out, "-m", "qwq-plus", "--json-schema", str(schema)).exit_code == 0
    assert sim.stats.requests == sent  # resumed, not paid again
    assert pl.read_csv(out)["reply_json_valid"].to_list() == [False, False]


def test_an_image_file_of_another_type_in_a_messages_column_fails_only_its_row(simulator, tmp_path):
    sim = simulator()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a.png").write_bytes(PNG)
    cells = [
        json.dumps([{"role": "user", "content": [{"image": (tmp_path / name).as_uri()}, {"text": "what?"}]}])
        for name in ("notes.txt", "a.png")
    ]
    source = tmp_path / "in.csv"
    pl.DataFrame({"messages": cells}).write_csv(source)
    out = tmp_path / "out.csv"
    result = run(sim, source, out, "-m", "qwen-vl-max", "--messages-column", "messages")
    assert result.exit_code == 3, result.stderr
    frame = pl.read_csv(out)
    assert frame["status"].to_list() == ["error", "ok"]
    assert frame["error_code"][0] == "batchgen.InvalidImage"


def test_dashscope_rules_apply_to_dashscope_only(simulator, tmp_path):
    from click.testing import CliRunner

    from batchgen.cli import cli

    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["hello"], photo=["https://example.com/a.png"])
    # DashScope's compatible mode: a text model reads no images, JSON mode needs "json".
    for extra in (["--image-column", "photo"], ["--json"]):
        result = run(sim, source, tmp_path / "o.csv", "--api", "openai", *extra)
        assert result.exit_code == 2, result.stderr
    assert sim.stats.requests == 0
    # Another server decides for itself: the rows are sent.
    other = sim.base_url.replace("/api/v1", "/compatible-mode/v1")
    result = CliRunner().invoke(
        cli,
        ["run", str(source), "-o", str(tmp_path / "p.csv"), "--api", "openai", "--base-url", other, "--json"],
        env={"OPENAI_API_KEY": KEY},
    )
    assert result.exit_code == 3 and sim.stats.requests == 1  # the simulator, like DashScope, refuses


def test_a_text_only_row_gets_the_same_reply_on_every_route(simulator, tmp_path):
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:3])
    native, openai = tmp_path / "n.csv", tmp_path / "o.csv"
    assert run(sim, source, native, "-m", "qwen3-vl-plus").exit_code == 0
    assert run(sim, source, openai, "-m", "qwen3-vl-plus", "--api", "openai").exit_code == 0
    assert pl.read_csv(native)["reply"].to_list() == pl.read_csv(openai)["reply"].to_list()


def test_a_compatible_mode_token_throttle_is_retried_and_slows_the_token_rate(simulator, tmp_path):
    # DashScope's compatible mode words its TPM throttle as 429 insufficient_quota (#token-limit):
    # a throttle that clears within the minute, not an empty account.
    sim = simulator(tpm=6000)  # 100 tokens a second: these rows overshoot it at once
    source = write_prompts(tmp_path / "in.csv", PROMPTS[:10])
    out = tmp_path / "out.parquet"

    result = run(sim, source, out, "--api", "openai", "--max-tokens", "20")

    assert result.exit_code == 0, result.stderr
    assert sim.stats.outcomes["quota_tpm_429"] > 0
    assert pl.read_parquet(out)["status"].unique().to_list() == ["ok"]
    assert "stopped" not in result.stderr


def test_a_file_named_like_an_image_that_is_not_one_is_a_row_error(simulator, tmp_path):
    (tmp_path / "notes.png").write_text("meeting notes, not a picture")
    (tmp_path / "photo.png").write_bytes(JPEG)  # a JPEG under a .png name: sent as what it is
    (tmp_path / "ok.png").write_bytes(PNG)
    sim = simulator()
    source = write_prompts(tmp_path / "in.csv", ["a", "b", "c"], photo=["notes.png", "photo.png", "ok.png"])
    out = tmp_path / "out.parquet"

    result = run(sim, source, out, "-m", "qwen3-vl-plus", "--image-column", "photo")

    assert result.exit_code == 3, result.stderr
    frame = pl.read_parquet(out)
    assert frame["status"].to_list() == ["error", "ok", "ok"]
    assert frame["error_code"][0] == "batchgen.InvalidImage"
    assert "first bytes are not those of a" in frame["error_message"][0]
    assert frame["attempts"][0] == 0  # never sent
    assert sim.stats.requests == 2
    jpeg_id, png_id = (image_id(f"data:x;base64,{base64.b64encode(b).decode()}") for b in (JPEG, PNG))
    assert jpeg_id in frame["reply"][1] and png_id in frame["reply"][2]


def test_local_images_are_sent_with_the_type_their_bytes_show(tmp_path):
    from batchgen.images import data_uri, sniff

    (tmp_path / "photo.png").write_bytes(JPEG)
    assert data_uri((tmp_path / "photo.png").as_uri()).startswith("data:image/jpeg;base64,")
    assert sniff(PNG) == "image/png" and sniff(b"GIF89a....") == "image/gif"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"\x00\x00\x00\x18ftypheic\x00\x00") == "image/heic"
    assert sniff(b"hello, world") is None and sniff(b"") is None
    assert sniff(b"BMW service notes, not a bitmap") is None
    assert sniff(b"BM" + bytes(12) + (40).to_bytes(4, "little")) == "image/bmp"
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="first bytes"):
        data_uri((tmp_path / "notes.png").as_uri())
