"""The simulator's Batch API, a batch's life: states on the fake clock, result lines, expiry and
cancellation. (Validation: test_simulator_batches_validation.py; files, listing, limits and
faults: test_simulator_batches_api.py.)"""

from __future__ import annotations

import re
from typing import Any

import pytest
from simulator_support import (
    CHAT,
    CHAT_URL,
    EPOCH,
    PACE,
    TEST_URL,
    UUID,
    assert_batch_error,
    batch_api,
    batch_line,
    counts,
    create_batch,
    file_lines,
    get_batch,
    run_to_end,
)

from batchgen.simulator import simulated_reply

INTERNAL = "An internal error has occured, please try again later or contact service support."


def batch_object(batch_id: str, file_id: str, **changes: Any) -> dict[str, Any]:
    """A batch object as created: validating, nothing set, then ``changes``."""
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": CHAT_URL,
        "errors": None,
        "input_file_id": file_id,
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": EPOCH,
        "in_progress_at": None,
        "expires_at": None,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": {},
        **changes,
    }


# --- the life of a batch ----------------------------------------------------------------------


def test_a_batch_runs_to_completed_on_the_simulated_clock() -> None:
    with batch_api(**PACE) as (http, sim, clock):
        metadata = {"ds_name": "nightly", "ds_description": "two rows"}
        created = create_batch(http, [batch_line("a", "First"), batch_line("b", "Second")], metadata=metadata)
        batch_id, file_id = created["id"], created["input_file_id"]
        assert re.fullmatch(f"batch_{UUID}", batch_id)
        assert re.fullmatch("file-batch-[0-9a-f]{24}", file_id)
        assert created == batch_object(batch_id, file_id, metadata=metadata)
        assert get_batch(http, batch_id) == created  # the clock stands still: so does the batch

        clock.advance(10)
        running = batch_object(
            batch_id, file_id, metadata=metadata, status="in_progress", in_progress_at=EPOCH + 10
        )
        assert get_batch(http, batch_id) == {**running, "request_counts": counts(2, 0, 0)}
        clock.advance(1)
        assert get_batch(http, batch_id) == {**running, "request_counts": counts(2, 1, 0)}
        clock.advance(1)
        finalizing = {**running, "status": "finalizing", "finalizing_at": EPOCH + 12}
        assert get_batch(http, batch_id) == {**finalizing, "request_counts": counts(2, 2, 0)}
        clock.advance(4)
        assert get_batch(http, batch_id)["status"] == "finalizing"
        clock.advance(1)
        done = get_batch(http, batch_id)
        output_id = done["output_file_id"]
        assert re.fullmatch("file-batch_output-[0-9a-f]{24}", output_id)
        assert done == {
            **finalizing,
            "status": "completed",
            "completed_at": EPOCH + 17,
            "output_file_id": output_id,
            "request_counts": counts(2, 2, 0),
        }
        lines = file_lines(http, output_id)
        content = http.get(f"/files/{output_id}/content").content
        output = http.get(f"/files/{output_id}").json()

    assert sorted(line["custom_id"] for line in lines) == ["a", "b"]
    assert output == {
        "id": output_id,
        "object": "file",
        "bytes": len(content),
        "filename": f"{batch_id}_output.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "created_at": EPOCH + 17,
    }
    assert sorted(sim.stats.batch.executed) == [(batch_id, "a"), (batch_id, "b")]
    assert sim.stats.batch.created == [batch_id]
    assert sim.stats.batch.calls == {
        "upload": 1,
        "create": 1,
        "retrieve": 6,
        "file_content": 2,
        "file_retrieve": 1,
    }
    assert (sim.stats.routes["files"], sim.stats.routes["batches"], sim.stats.requests) == (4, 7, 11)


def test_batch_speed_scales_the_simulator_clock() -> None:
    with batch_api(**PACE, batch_speed=3600) as (http, _, clock):
        batch_id = create_batch(http, [batch_line("a")])["id"]
        clock.advance(10 / 3600)  # ten simulated seconds
        assert get_batch(http, batch_id)["status"] == "in_progress"
        clock.advance(6 / 3600)
        batch = get_batch(http, batch_id)
    assert (batch["status"], batch["completed_at"], batch["request_counts"]) == (
        "completed",
        EPOCH + 16,
        counts(1, 1, 0),
    )


def test_counts_stand_still_for_the_queue_time_before_lines_run() -> None:
    with batch_api(**PACE, batch_queue_seconds=600) as (http, _, clock):
        batch_id = create_batch(http, [batch_line("a")])["id"]
        clock.advance(10 + 600)
        queued = get_batch(http, batch_id)
        clock.advance(1)
        ran = get_batch(http, batch_id)
    assert (queued["status"], queued["in_progress_at"], queued["request_counts"]) == (
        "in_progress",
        EPOCH + 10,
        counts(1, 0, 0),
    )
    assert (ran["status"], ran["request_counts"]) == ("finalizing", counts(1, 1, 0))


# --- what each line answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bodies",
    [
        pytest.param(
            [
                {},
                {"max_tokens": 5},
                {"temperature": 0.3, "seed": 7, "top_p": 0.5},
                {"response_format": {"type": "json_object"}, "enable_thinking": False},
            ],
            id="not-thinking",
        ),
        pytest.param(
            [{"enable_thinking": True}, {"enable_thinking": True, "thinking_budget": 12}], id="thinking"
        ),
    ],
)
def test_a_line_gets_what_the_chat_route_answers_for_its_body(bodies: list[dict[str, Any]]) -> None:
    lines = [batch_line(f"r{i}", f"Tell me json thing {i}", **extra) for i, extra in enumerate(bodies)]
    with batch_api(**PACE) as (http, _, clock):
        batch = run_to_end(http, clock, create_batch(http, lines)["id"])
        results = {line["custom_id"]: line for line in file_lines(http, batch["output_file_id"])}
        online = {line["custom_id"]: http.post(CHAT, json=line["body"]).json() for line in lines}

    assert batch["request_counts"] == counts(len(lines), len(lines), 0)
    assert [result["created"] for result in _bodies(results)] == sorted(_created(results))
    for custom_id, result in results.items():
        request_id = result["response"]["request_id"]
        assert result["id"] == request_id
        assert result["error"] is None and result["response"]["status_code"] == 200
        body = result["response"]["body"]
        assert body["id"] == f"chatcmpl-{request_id}"
        assert _without_ids(body) == _without_ids(online[custom_id])
    assert sorted(_created(results)) == [EPOCH + 10 + n for n in range(1, len(lines) + 1)]


def _bodies(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [result["response"]["body"] for result in results.values()]


def _created(results: dict[str, Any]) -> list[int]:
    return [body["created"] for body in _bodies(results)]


def _without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key not in ("id", "created")}


def test_lines_the_chat_route_refuses_go_to_the_error_file_with_its_status_and_error() -> None:
    refused = {
        "temperature": batch_line("hot", temperature=5),
        "inspection": batch_line("bad", "Say [sim:DataInspectionFailed] now"),
        "internal": batch_line("oops", "Say [sim:InternalError] now"),
        "output": batch_line("out", "Say [sim:OutputInspection] now"),
        "empty": {**batch_line("empty"), "body": {"model": "qwen-plus", "messages": []}},
    }
    with batch_api(**PACE) as (http, sim, clock):
        batch = run_to_end(http, clock, create_batch(http, [batch_line("fine"), *refused.values()])["id"])
        errors = {line["custom_id"]: line for line in file_lines(http, batch["error_file_id"])}
        output = file_lines(http, batch["output_file_id"])
        online = {line["custom_id"]: http.post(CHAT, json=line["body"]) for line in refused.values()}

    assert batch["request_counts"] == counts(6, 1, 5)
    assert [line["custom_id"] for line in output] == ["fine"]
    assert {custom_id: line["response"]["status_code"] for custom_id, line in errors.items()} == {
        "hot": 400,
        "bad": 400,
        "oops": 500,
        "out": 400,
        "empty": 400,
    }
    for custom_id, line in errors.items():
        assert line["id"] == line["response"]["request_id"] and line["error"] is None
        assert line["response"]["status_code"] == online[custom_id].status_code
        assert line["response"]["body"] == {"error": online[custom_id].json()["error"]}
    assert len(sim.stats.batch.executed) == 6  # refused lines ran (and are not billed)


def test_the_line_500_fault_fails_lines_in_the_http_failure_shape() -> None:
    with batch_api(**PACE, batch_fault_line_500=1.0) as (http, sim, clock):
        batch = run_to_end(http, clock, create_batch(http, [batch_line("a"), batch_line("b")])["id"])
        errors = file_lines(http, batch["error_file_id"])
    assert len(sim.stats.batch.executed) == 2  # they ran, and failed

    assert (batch["status"], batch["output_file_id"], batch["request_counts"]) == (
        "completed",
        None,
        counts(2, 0, 2),
    )
    assert [line["response"]["body"] for line in errors] == [
        {"error": {"message": INTERNAL, "type": "internal_error", "param": None, "code": "internal_error"}}
    ] * 2
    assert [line["response"]["status_code"] for line in errors] == [500, 500]


def test_result_lines_come_in_an_order_of_their_own_the_order_they_ran() -> None:
    ids = [f"{n:02d}" for n in range(30)]
    with batch_api(**PACE) as (http, sim, clock):
        batch = run_to_end(http, clock, create_batch(http, [batch_line(i, f"Row {i}") for i in ids])["id"])
        order = [line["custom_id"] for line in file_lines(http, batch["output_file_id"])]

    assert order != ids and sorted(order) == ids
    assert sim.stats.batch.executed == [(batch["id"], custom_id) for custom_id in order]


def test_batch_test_model_answers_the_fixed_test_result_without_running_a_model() -> None:
    lines = [
        batch_line("1", url=TEST_URL, model="batch-test-model"),
        batch_line("2", "Even [sim:InternalError] here", url=TEST_URL, model="batch-test-model"),
    ]
    with batch_api(**PACE) as (http, _, clock):
        batch = run_to_end(http, clock, create_batch(http, lines, endpoint=TEST_URL)["id"])
        results = file_lines(http, batch["output_file_id"])

    assert (batch["endpoint"], batch["request_counts"]) == (TEST_URL, counts(2, 2, 0))
    for result in results:
        body = result["response"]["body"]
        assert re.fullmatch(f"chatcmpl-{UUID}", body.pop("id"))
        assert isinstance(body.pop("created"), int)
        assert body == {
            "usage": {"completion_tokens": 6, "prompt_tokens": 20, "total_tokens": 26},
            "model": "batch-test-model",
            "choices": [
                {"finish_reason": "stop", "index": 0, "message": {"content": "This is a test result."}}
            ],
            "object": "chat.completion",
        }


def test_stream_is_dropped_and_stream_only_models_answer_in_a_batch() -> None:
    with batch_api(**PACE) as (http, _, clock):
        online = http.post(CHAT, json=batch_line("x", model="qwq-plus")["body"])
        lines = [batch_line("a", model="qwq-plus", stream=True), batch_line("b", "Other", model="qwq-plus")]
        batch = run_to_end(http, clock, create_batch(http, lines)["id"])
        results = {line["custom_id"]: line for line in file_lines(http, batch["output_file_id"])}

    assert online.status_code == 400  # unstreamed, qwq-plus refuses online; a batch runs it
    assert batch["request_counts"] == counts(2, 2, 0)
    expected = simulated_reply("qwq-plus", [{"role": "user", "content": "Hi there"}])
    message = results["a"]["response"]["body"]["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": expected.content,
        "reasoning_content": expected.reasoning,
    }


# --- expiry and cancellation --------------------------------------------------------------------

EXPIRED = "This request could not be executed before the completion window expired."
CANCELLED = "This request was not executed because the batch was cancelled."


def test_a_batch_past_its_window_expires_keeping_the_lines_that_ran() -> None:
    # A line an hour, starting 10 s in: by the 1d deadline lines 1..23 have run, 7 have not.
    knobs = {**PACE, "batch_lines_per_second": 1 / 3600}
    with batch_api(**knobs) as (http, sim, clock):
        created = create_batch(http, [batch_line(f"{n:02d}") for n in range(30)], window="1d")
        clock.advance(86_399)
        before = get_batch(http, created["id"])
        clock.advance(1)
        expired = get_batch(http, created["id"])
        output = file_lines(http, expired["output_file_id"])
        errors = file_lines(http, expired["error_file_id"])
        clock.advance(10 * 86_400)
        assert get_batch(http, created["id"]) == expired

    assert (before["status"], before["request_counts"]) == ("in_progress", counts(30, 23, 0))
    assert (expired["status"], expired["expired_at"], expired["completed_at"]) == (
        "expired",
        EPOCH + 86_400,
        None,
    )
    assert (expired["expires_at"], expired["request_counts"]) == (None, counts(30, 23, 7))
    assert len(output) == 23
    ran = {custom_id for _, custom_id in sim.stats.batch.executed}
    assert ran == {line["custom_id"] for line in output} and len(sim.stats.batch.executed) == 23
    assert {line["custom_id"] for line in errors} == {f"{n:02d}" for n in range(30)} - ran
    for line in errors:
        assert re.fullmatch(UUID, line.pop("id"))
        assert line == {
            "custom_id": line["custom_id"],
            "response": None,
            "error": {"code": "batch_expired", "message": EXPIRED},
        }


def test_cancel_mid_run_keeps_the_finished_lines_and_fails_the_rest() -> None:
    with batch_api(**PACE) as (http, sim, clock):
        created = create_batch(http, [batch_line(str(n)) for n in range(5)])
        clock.advance(12.5)  # two lines have run
        cancelling = http.post(f"/batches/{created['id']}/cancel")
        clock.advance(4)
        still = get_batch(http, created["id"])
        clock.advance(1)
        cancelled = get_batch(http, created["id"])
        output = file_lines(http, cancelled["output_file_id"])
        errors = file_lines(http, cancelled["error_file_id"])
        clock.advance(1000)
        assert get_batch(http, created["id"]) == cancelled
        again = http.post(f"/batches/{created['id']}/cancel")

    running = {
        **created,
        "status": "cancelling",
        "in_progress_at": EPOCH + 10,
        "request_counts": counts(5, 2, 0),
    }
    assert cancelling.status_code == 200
    assert cancelling.json() == still == running  # cancelling_at stays null, as the real service has it
    assert cancelled == {
        **running,
        "status": "cancelled",
        "cancelling_at": EPOCH + 17,
        "cancelled_at": EPOCH + 17,
        "output_file_id": cancelled["output_file_id"],
        "error_file_id": cancelled["error_file_id"],
        "request_counts": counts(5, 2, 3),
    }
    first_two = [custom_id for _, custom_id in sim.stats.batch.executed]
    assert len(first_two) == 2 and [line["custom_id"] for line in output] == first_two
    assert [line["error"] for line in errors] == [{"code": "batch_cancelled", "message": CANCELLED}] * 3
    assert {line["custom_id"] for line in errors} == {str(n) for n in range(5)} - set(first_two)
    assert_batch_error(again, 409, "Cannot cancel a batch with status 'cancelled'.", code=None)


def test_cancel_while_validating_runs_nothing() -> None:
    with batch_api(**PACE) as (http, sim, clock):
        created = create_batch(http, [batch_line("a"), batch_line("b")])
        clock.advance(3)
        cancelling = http.post(f"/batches/{created['id']}/cancel").json()
        again = http.post(f"/batches/{created['id']}/cancel")
        clock.advance(5)
        cancelled = get_batch(http, created["id"])

    assert cancelling == {**created, "status": "cancelling"}
    assert_batch_error(again, 409, "Cannot cancel a batch with status 'cancelling'.", code=None)
    assert cancelled == {
        **created,
        "status": "cancelled",
        "cancelling_at": EPOCH + 8,
        "cancelled_at": EPOCH + 8,
    }
    assert sim.stats.batch.executed == []


@pytest.mark.parametrize(("seconds", "status"), [(11, "finalizing"), (20, "completed"), (10, "failed")])
def test_only_a_validating_or_running_batch_can_be_cancelled(seconds: float, status: str) -> None:
    lines = [batch_line("a")] if status != "failed" else ["not json"]
    with batch_api(**PACE) as (http, _, clock):
        created = create_batch(http, lines)
        clock.advance(seconds)
        response = http.post(f"/batches/{created['id']}/cancel")
        assert get_batch(http, created["id"])["status"] == status
    assert_batch_error(response, 409, f"Cannot cancel a batch with status '{status}'.", code=None)
