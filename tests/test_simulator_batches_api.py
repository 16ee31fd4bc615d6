"""The simulator's Files and Batch API calls: files, creating and listing batches, the account's
limits, the management faults, and ``batchgen simulate``'s batch options."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from simulator_support import (
    CHAT_URL,
    EPOCH,
    RATE,
    TEST_URL,
    assert_batch_error,
    assert_openai_error,
    batch_api,
    batch_line,
    create_batch,
    get_batch,
    jsonl,
    upload,
)

from batchgen.cli import cli
from batchgen.simulator import BatchLimits, SimulatorConfig

CONTENT = jsonl([batch_line("a"), batch_line("b")])


def batch_body(file_id: str, **changes: Any) -> dict[str, Any]:
    return {"input_file_id": file_id, "endpoint": CHAT_URL, "completion_window": "24h", **changes}


# --- files -------------------------------------------------------------------------------------


def test_upload_answers_the_file_object() -> None:
    with batch_api() as (http, sim, _):
        response = http.post("/files", files={"file": ("rows.jsonl", CONTENT)}, data={"purpose": "batch"})
        file = response.json()
        retrieved = http.get(f"/files/{file['id']}").json()

    assert response.status_code == 200 and response.headers["x-request-id"]
    assert re.fullmatch("file-batch-[0-9a-f]{24}", file["id"])
    assert file == {
        "id": file["id"],
        "object": "file",
        "bytes": len(CONTENT),
        "filename": "rows.jsonl",
        "purpose": "batch",
        "status": "processed",
        "created_at": EPOCH,
        "status_details": None,
    }
    assert retrieved == {key: value for key, value in file.items() if key != "status_details"}
    assert sim.stats.batch.files_uploaded == 1


@pytest.mark.parametrize(
    ("files", "data", "message", "param"),
    [
        ({"file": ("a.jsonl", CONTENT)}, {}, "The purpose must be 'batch' (got missing).", "purpose"),
        ({"file": ("a.jsonl", CONTENT)}, {"purpose": "fine-tune"},
         "The purpose must be 'batch' (got 'fine-tune').", "purpose"),
        (None, {"purpose": "batch"}, "Missing required parameter: 'file'.", "file"),
        ({"file": ("a.jsonl", b"x" * 1001)}, {"purpose": "batch"},
         "The file is larger than the maximum of 1000 bytes.", "file"),
    ],
)  # fmt: skip
def test_uploads_the_service_refuses(files: Any, data: dict[str, str], message: str, param: str) -> None:
    with batch_api(batch_limits=BatchLimits(file_bytes=1000)) as (http, sim, _):
        if files is None:  # a form with no file part still goes as multipart
            response = http.post("/files", files={"other": ("x", b"")}, data=data)
        else:
            response = http.post("/files", files=files, data=data)
    assert_batch_error(response, 400, message, param=param, code="invalid_parameter_error")
    assert sim.stats.batch.files_uploaded == 0


def test_an_upload_must_be_multipart() -> None:
    with batch_api() as (http, _, _):
        response = http.post("/files", json={"purpose": "batch"})
    assert_batch_error(
        response,
        400,
        "The request must be multipart/form-data with a file and purpose=batch.",
        code="invalid_parameter_error",
    )


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (BatchLimits(stored_files=2), "Upload file number exceed limit."),
        (BatchLimits(stored_bytes=2 * len(CONTENT) + 1), "Upload file capacity exceed limit."),
    ],
)
def test_storage_is_limited_until_files_are_deleted(limits: BatchLimits, message: str) -> None:
    with batch_api(batch_limits=limits) as (http, sim, _):
        first = upload(http, CONTENT)
        upload(http, CONTENT)
        full = http.post("/files", files={"file": ("c.jsonl", CONTENT)}, data={"purpose": "batch"})
        deleted = http.delete(f"/files/{first}")
        after = http.post("/files", files={"file": ("c.jsonl", CONTENT)}, data={"purpose": "batch"})

    assert_batch_error(full, 400, message, code="invalid_parameter_error")
    assert deleted.json() == {"id": first, "object": "file", "deleted": True}
    assert after.status_code == 200
    assert (sim.stats.batch.files_uploaded, sim.stats.batch.files_deleted) == (3, 1)


def test_deleted_and_unknown_files_are_not_found() -> None:
    with batch_api() as (http, _, _):
        file_id = upload(http, CONTENT)
        assert http.delete(f"/files/{file_id}").status_code == 200
        calls = [
            http.get(f"/files/{file_id}"),
            http.delete(f"/files/{file_id}"),
            http.get(f"/files/{file_id}/content"),
        ]
    for response in calls:
        assert_batch_error(response, 404, f"No such file: {file_id}", param="file_id", code="not_found")


def test_an_input_file_cannot_be_read_back() -> None:
    with batch_api() as (http, _, _):
        file_id = upload(http, CONTENT)
        response = http.get(f"/files/{file_id}/content")
    assert_batch_error(
        response,
        400,
        f"The content of file {file_id} cannot be downloaded: only result files (ids starting with "
        "'file-batch_output-') can be; input files cannot be read back.",
        param="file_id",
        code="invalid_parameter_error",
    )


def test_files_list_newest_first_and_pages() -> None:
    with batch_api() as (http, _, _):
        ids = [upload(http, CONTENT) for _ in range(3)]
        first = http.get("/files", params={"limit": 2}).json()
        rest = http.get("/files", params={"limit": 2, "after": ids[1]}).json()
    assert ([f["id"] for f in first["data"]], first["has_more"]) == ([ids[2], ids[1]], True)
    assert ([f["id"] for f in rest["data"]], rest["has_more"], rest["object"]) == ([ids[0]], False, "list")


# --- creating batches --------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["24h", "336h", "1d", "14d", "48h"])
def test_completion_windows_from_24h_to_336h(window: str) -> None:
    with batch_api() as (http, _, _):
        response = http.post("/batches", json=batch_body(upload(http, CONTENT), completion_window=window))
    assert (response.status_code, response.json()["completion_window"]) == (200, window)


@pytest.mark.parametrize("window", ["23h", "337h", "15d", "0d", "1.5d", "24", "24H", " 24h", 24])
def test_other_completion_windows_are_refused(window: Any) -> None:
    with batch_api() as (http, sim, _):
        response = http.post("/batches", json=batch_body(upload(http, CONTENT), completion_window=window))
    if isinstance(window, str):
        message = (
            f"Invalid completion_window '{window}': a whole number of hours from 24h to 336h, or of days "
            "from 1d to 14d."
        )
    else:
        message = "Missing required parameter: 'completion_window'."
    assert_batch_error(response, 400, message, param="completion_window", code="invalid_parameter_error")
    assert sim.stats.batch.created == []


@pytest.mark.parametrize(
    ("changes", "message", "param"),
    [
        ({"input_file_id": None}, "Missing required parameter: 'input_file_id'.", "input_file_id"),
        ({"input_file_id": "file-batch-000000000000000000000000"},
         "The input file file-batch-000000000000000000000000 does not exist or is not a batch input file.",
         "input_file_id"),
        ({"endpoint": "/v1/embeddings"},
         "Unsupported endpoint '/v1/embeddings': use /v1/chat/completions (or /v1/chat/ds-test for "
         "batch-test-model).", "endpoint"),
        ({"metadata": {"ds_name": "n" * 101}}, "metadata.ds_name may be at most 100 characters.",
         "metadata.ds_name"),
        ({"metadata": {"ds_description": "d" * 201}},
         "metadata.ds_description may be at most 200 characters.", "metadata.ds_description"),
        ({"metadata": {"count": 3}}, "Parameter metadata should be an object of string values.", "metadata"),
    ],
)  # fmt: skip
def test_creates_the_service_refuses(changes: dict[str, Any], message: str, param: str) -> None:
    with batch_api() as (http, _, _):
        response = http.post("/batches", json=batch_body(upload(http, CONTENT), **changes))
    assert_batch_error(response, 400, message, param=param, code="invalid_parameter_error")


def test_a_create_body_must_be_a_json_object() -> None:
    with batch_api() as (http, _, _):
        responses = [http.post("/batches", content=b"{nope"), http.post("/batches", json=[1])]
    assert_batch_error(
        responses[0], 400, "The request body is not valid JSON.", code="invalid_parameter_error"
    )
    assert_batch_error(
        responses[1], 400, "The request body should be a JSON object.", code="invalid_parameter_error"
    )


def test_a_result_file_cannot_be_a_batch_input() -> None:
    with batch_api(batch_validation_seconds=0, batch_finalizing_seconds=0) as (http, _, clock):
        batch_id = create_batch(http, [batch_line("a")])["id"]
        clock.advance(1)
        output_id = get_batch(http, batch_id)["output_file_id"]
        response = http.post("/batches", json=batch_body(output_id))
    assert_batch_error(
        response,
        400,
        f"The input file {output_id} does not exist or is not a batch input file.",
        param="input_file_id",
        code="invalid_parameter_error",
    )


def test_a_batch_reads_its_file_at_create_time() -> None:
    with batch_api() as (http, _, clock):
        batch = create_batch(http, [batch_line("a")])
        http.delete(f"/files/{batch['input_file_id']}")
        clock.advance(100)
        assert get_batch(http, batch["id"])["request_counts"] == {"total": 1, "completed": 1, "failed": 0}


# --- listing -----------------------------------------------------------------------------------


def listed(http: httpx.Client, **params: Any) -> dict[str, Any]:
    response = http.get("/batches", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def ids_of(page: dict[str, Any]) -> list[str]:
    return [batch["id"] for batch in page["data"] or []]


def test_the_list_is_newest_first_and_pages_with_after() -> None:
    with batch_api() as (http, _, clock):
        empty = listed(http)
        ids = []
        for _ in range(5):
            ids.append(create_batch(http, [batch_line("a")])["id"])
            clock.advance(1)
        newest = ids[::-1]
        pages = [
            listed(http, limit=2),
            listed(http, limit=2, after=newest[1]),
            listed(http, limit=2, after=newest[3]),
        ]
        everything = listed(http)
        unknown = listed(http, after="batch_00000000-0000-4000-8000-000000000000")

    assert empty == {"object": "list", "data": None, "first_id": None, "last_id": None, "has_more": False}
    assert [ids_of(page) for page in pages] == [newest[0:2], newest[2:4], newest[4:]]
    assert [page["has_more"] for page in pages] == [True, True, False]
    assert [(page["first_id"], page["last_id"]) for page in pages] == [
        (newest[0], newest[1]),
        (newest[2], newest[3]),
        (newest[4], newest[4]),
    ]
    assert ids_of(everything) == newest and everything["has_more"] is False
    assert everything["data"][0] == get_batch_object(everything, newest[0])
    assert unknown["data"] is None


def get_batch_object(page: dict[str, Any], batch_id: str) -> dict[str, Any]:
    (found,) = [batch for batch in page["data"] if batch["id"] == batch_id]
    return found


def test_the_list_filters() -> None:
    # Batch times: EPOCH + 0 (nightly-a), + 100 (nightly-b), + 200 (adhoc), validating 50 s each.
    with batch_api(batch_validation_seconds=50, batch_finalizing_seconds=0) as (http, _, clock):
        a = create_batch(http, [batch_line("a")], metadata={"ds_name": "nightly-a"})
        clock.advance(100)
        b = create_batch(http, [batch_line("a")], metadata={"ds_name": "nightly-b", "ds_description": "x"})
        clock.advance(100)
        c = create_batch(http, ["broken"], metadata={"ds_name": "adhoc"})
        clock.advance(60)  # a and b completed, c failed
        pages = {
            "name": listed(http, ds_name="nightly"),
            "name-exact": listed(http, ds_name="nightly-b"),
            "files": listed(http, input_file_ids=f"{a['input_file_id']}, {c['input_file_id']}"),
            "status": listed(http, status="failed"),
            "statuses": listed(http, status="failed,completed"),
            "after": listed(http, create_after=_stamp(EPOCH + 100)),
            "before": listed(http, create_before=_stamp(EPOCH + 100)),
            "window": listed(http, create_after=_stamp(EPOCH + 1), create_before=_stamp(EPOCH + 199)),
            "none": listed(http, ds_name="weekly"),
        }
    assert {name: ids_of(page) for name, page in pages.items()} == {
        "name": [b["id"], a["id"]],
        "name-exact": [b["id"]],
        "files": [c["id"], a["id"]],
        "status": [c["id"]],
        "statuses": [c["id"], b["id"], a["id"]],
        "after": [c["id"], b["id"]],
        "before": [b["id"], a["id"]],
        "window": [b["id"]],
        "none": [],
    }


def _stamp(unix: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y%m%d%H%M%S")


@pytest.mark.parametrize(
    ("params", "message", "param"),
    [
        ({"limit": 0}, "Parameter limit should be an integer in [1, 100].", "limit"),
        ({"limit": 101}, "Parameter limit should be an integer in [1, 100].", "limit"),
        ({"limit": "ten"}, "Parameter limit should be an integer in [1, 100].", "limit"),
        ({"status": "done"},
         "Unknown status: done; expected some of cancelled, cancelling, completed, expired, failed, "
         "finalizing, in_progress, validating.", "status"),
        ({"input_file_ids": ",".join(f"file-batch-{n}" for n in range(21))},
         "At most 20 input_file_ids can be given.", "input_file_ids"),
        ({"create_after": "2025-03-04"},
         "Parameter create_after should be a time as yyyyMMddHHmmss, e.g. 20250304123000.", "create_after"),
    ],
)  # fmt: skip
def test_list_parameters_the_service_refuses(params: dict[str, Any], message: str, param: str) -> None:
    with batch_api() as (http, _, _):
        response = http.get("/batches", params=params)
    assert_batch_error(response, 400, message, param=param, code="invalid_parameter_error")


def test_batches_are_kept_for_30_days() -> None:
    with batch_api() as (http, _, clock):
        batch_id = create_batch(http, [batch_line("a")])["id"]
        clock.advance(30 * 86400 - 1)
        kept = (http.get(f"/batches/{batch_id}").status_code, ids_of(listed(http)))
        clock.advance(1)
        gone = http.get(f"/batches/{batch_id}")
        listing = listed(http)
    assert kept == (200, [batch_id])
    assert_batch_error(gone, 404, f"No such batch: {batch_id}", param="batch_id", code="not_found")
    assert listing["data"] is None


# --- the gateway's checks, limits and faults ---------------------------------------------------


def test_the_key_is_checked_as_on_the_chat_route() -> None:
    with batch_api() as (http, sim, _):
        responses = [
            http.get("/batches", headers={"Authorization": "Bearer sk-wrong"}),
            http.post(
                "/files",
                files={"file": ("a", CONTENT)},
                data={"purpose": "batch"},
                headers={"Authorization": ""},
            ),
        ]
    for response in responses:
        assert_openai_error(
            response, 401, "invalid_api_key", "invalid_request_error", "Incorrect API key provided."
        )
    assert sim.stats.batch.files_uploaded == 0


def test_unknown_routes_and_ids_are_not_found() -> None:
    with batch_api() as (http, _, _):
        responses = {
            "route": http.get("/batches/x/y/z"),
            "method": http.put("/files"),
            "batch": http.get("/batches/batch_nope"),
            "cancel": http.post("/batches/batch_nope/cancel"),
        }
    assert_batch_error(
        responses["route"], 404, "Unknown route: GET /compatible-mode/v1/batches/x/y/z", code="not_found"
    )
    assert_batch_error(
        responses["method"], 404, "Unknown route: PUT /compatible-mode/v1/files", code="not_found"
    )
    for name in ("batch", "cancel"):
        assert_batch_error(
            responses[name], 404, "No such batch: batch_nope", param="batch_id", code="not_found"
        )


def test_the_429_fault_throttles_management_calls_in_the_chat_routes_words() -> None:
    with batch_api(batch_fault_429=1.0) as (http, sim, _):
        responses = [
            http.post("/files", files={"file": ("a", CONTENT)}, data={"purpose": "batch"}),
            http.get("/batches"),
            http.get("/files/file-batch-x"),
        ]
    for response in responses:
        assert_openai_error(response, 429, "limit_requests", "limit_requests", RATE)
    assert sim.stats.batch.throttled == {"upload": 1, "list": 1, "file_retrieve": 1}
    assert sim.stats.batch.files_uploaded == 0


@pytest.mark.parametrize(
    ("limits", "call"),
    [
        (BatchLimits(list_per_minute=2), lambda http, batch_id: http.get("/batches")),
        (BatchLimits(retrieve_per_minute=2), lambda http, batch_id: http.get(f"/batches/{batch_id}")),
        (
            BatchLimits(create_per_minute=3),
            lambda http, batch_id: http.post("/batches", json=batch_body(batch_id)),
        ),
        (BatchLimits(cancel_per_minute=2), lambda http, batch_id: http.post(f"/batches/{batch_id}/cancel")),
    ],
    ids=["list", "retrieve", "create", "cancel"],
)
def test_per_minute_limits_throttle_until_a_minute_has_passed(limits: BatchLimits, call: Any) -> None:
    with batch_api(batch_limits=limits) as (http, sim, clock):
        batch = create_batch(http, [batch_line("a")])  # one create of the three
        target = batch["input_file_id"] if limits.create_per_minute == 3 else batch["id"]
        first = [call(http, target).status_code for _ in range(2)]
        throttled = call(http, target)
        clock.advance(59)
        still = call(http, target).status_code
        clock.advance(1)
        again = call(http, target).status_code

    assert all(status != 429 for status in first) and again != 429
    assert_openai_error(throttled, 429, "limit_requests", "limit_requests", RATE)
    assert still == 429 and sum(sim.stats.batch.throttled.values()) == 2


def test_unfinished_batches_are_limited() -> None:
    running = "The number of unfinished batches has reached the limit of 2; wait for some to finish."
    testing = running.replace("batches", "batch-test-model batches")
    test_lines = [batch_line("a", url=TEST_URL, model="batch-test-model")]
    with batch_api(batch_limits=BatchLimits(running=2)) as (http, _, clock):
        file_id = upload(http, CONTENT)
        for _ in range(2):
            http.post("/batches", json=batch_body(file_id))
        full = http.post("/batches", json=batch_body(file_id))
        clock.advance(100)  # both finished
        assert http.post("/batches", json=batch_body(file_id)).status_code == 200
    with batch_api() as (http, _, clock):
        for _ in range(2):
            create_batch(http, test_lines, endpoint=TEST_URL)
        tests_full = http.post(
            "/batches", json=batch_body(upload(http, jsonl(test_lines)), endpoint=TEST_URL)
        )
        other = http.post("/batches", json=batch_body(upload(http, CONTENT)))
    assert_batch_error(full, 429, running, code="limit_requests", kind="limit_requests")
    assert_batch_error(tests_full, 429, testing, code="limit_requests", kind="limit_requests")
    assert other.status_code == 200


def test_a_lost_create_answer_leaves_a_batch_the_list_finds() -> None:
    with batch_api(batch_fault_lost_create=1.0) as (http, sim, clock):
        file_id = upload(http, CONTENT)
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            http.post("/batches", json=batch_body(file_id, metadata={"ds_name": "job-7"}))
        found = listed(http, input_file_ids=file_id)
        clock.advance(100)
        done = listed(http, ds_name="job-7")

    (batch,) = found["data"]
    assert sim.stats.batch.created == sim.stats.batch.lost_creates == [batch["id"]]
    assert (batch["status"], batch["input_file_id"], batch["metadata"]) == (
        "validating",
        file_id,
        {"ds_name": "job-7"},
    )
    assert ids_of(done) == [batch["id"]] and done["data"][0]["status"] == "completed"


def test_the_chat_routes_faults_and_quotas_do_not_touch_the_batch_api() -> None:
    with batch_api(fault_500=1.0, rpm=1) as (http, sim, _):
        statuses = [http.get("/batches").status_code for _ in range(3)]
        chat = http.post("/chat/completions", json=batch_line("a")["body"])
    assert statuses == [200, 200, 200]
    assert chat.status_code == 500
    assert sim.stats.outcomes == {"fault_500": 1}  # the batch calls are not outcomes


# --- batchgen simulate -------------------------------------------------------------------------


def test_simulate_passes_the_batch_options_to_the_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SimulatorConfig] = []
    monkeypatch.setattr("batchgen.simulator.serve_forever", lambda config, host, port: seen.append(config))
    args = [
        "simulate",
        "--batch-speed", "3600",
        "--batch-validation-seconds", "2",
        "--batch-queue-seconds", "60",
        "--batch-lines-per-second", "5",
        "--batch-finalizing-seconds", "3",
        "--batch-fault-429", "0.1",
        "--batch-fault-lost-create", "0.2",
        "--batch-fault-line-500", "0.3",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert (
        config.batch_speed,
        config.batch_validation_seconds,
        config.batch_queue_seconds,
        config.batch_lines_per_second,
        config.batch_finalizing_seconds,
        config.batch_fault_429,
        config.batch_fault_lost_create,
        config.batch_fault_line_500,
    ) == (3600, 2, 60, 5, 3, 0.1, 0.2, 0.3)


@pytest.mark.parametrize("option", ["--batch-speed", "--batch-lines-per-second"])
def test_simulate_refuses_a_batch_clock_that_stands_still(option: str) -> None:
    result = CliRunner().invoke(cli, ["simulate", option, "0"])
    assert result.exit_code == 2
    assert "0.0 is not in the range x>0" in result.output


def test_the_config_refuses_bad_batch_knobs() -> None:
    with pytest.raises(ValueError, match="batch_speed must be a finite number > 0, got 0"):
        SimulatorConfig(batch_speed=0)
    with pytest.raises(ValueError, match="batch_speed must be a finite number > 0, got inf"):
        SimulatorConfig(batch_speed=float("inf"))
    with pytest.raises(ValueError, match=r"batch_fault_429 must be a probability in \[0, 1\], got 2"):
        SimulatorConfig(batch_fault_429=2)
    with pytest.raises(ValueError, match="batch_queue_seconds must be >= 0, got -1"):
        SimulatorConfig(batch_queue_seconds=-1)
    with pytest.raises(ValueError, match="batch limit running must be an integer >= 1, got 0"):
        BatchLimits(running=0)
