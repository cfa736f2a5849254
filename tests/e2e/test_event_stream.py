"""GET /v1/fine_tuning/jobs/{id}/events?stream=true against a real worker: the whole history and then each
new event exactly once and in order, across a reconnect with Last-Event-ID, ending with the job. What is wrong with
a stream request is answered in this process: tests/api/test_events.py."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.budgets import budget
from tests.conftest import Stack, all_events, chat_lines, upload
from tests.tiny_model import TINY_MODEL_ID

# Run again on SQLite (make test-sqlite): events must commit in id order there too, whatever its locking.
pytestmark = pytest.mark.sqlite_e2e


def start_job(client: httpx.Client, n_examples: int = 24) -> str:
    file_id = upload(client, chat_lines(n_examples)).json()["id"]
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id,
        "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}}})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def read_stream(client: httpx.Client, job_id: str, *, last_event_id: str | None = None,
                stop_after: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(events received, the `end` event's data or None when we stopped reading first)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    with connect_sse(client, "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
                     headers=headers, timeout=budget(120)) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            if not sse.data:  # a keep-alive on a quiet stream (a slow machine's), handed on with the last id
                continue
            if sse.event == "end":
                return events, json.loads(sse.data)
            assert sse.event == "fine_tuning.job.event"
            event = json.loads(sse.data)
            assert sse.id == event["id"]
            events.append(event)
            if stop_after is not None and len(events) >= stop_after:
                return events, None
    raise AssertionError("the stream closed without an end event")


def test_the_stream_sends_history_then_live_events_once_and_ends_with_the_job(stack: Stack,
                                                                              client: httpx.Client) -> None:
    job_id = start_job(client)
    started = time.monotonic()
    events, end = read_stream(client, job_id)
    assert end == {"id": job_id, "status": "succeeded"}
    listed = all_events(client, job_id)
    assert [e["id"] for e in events] == [e["id"] for e in listed]  # each exactly once, in order
    assert events == listed
    assert any(e["type"] == "metrics" for e in events)
    assert events[-1]["message"] == "The job has successfully completed."
    # It was live: the stream opened right after the job was created and lasted until the job ended.
    assert time.monotonic() - started >= 1.0


def test_a_reconnect_with_last_event_id_resumes_without_gaps_or_duplicates(stack: Stack,
                                                                            client: httpx.Client) -> None:
    job_id = start_job(client)
    first, end = read_stream(client, job_id, stop_after=4)
    assert end is None and len(first) == 4
    time.sleep(0.5)  # events keep coming while no one listens
    rest, end = read_stream(client, job_id, last_event_id=first[-1]["id"])
    assert end is not None and end["status"] == "succeeded"
    combined = [e["id"] for e in first + rest]
    assert combined == [e["id"] for e in all_events(client, job_id)]
    assert len(set(combined)) == len(combined)

    # A finished job's stream is its history and the end, at once.
    replay, end = read_stream(client, job_id)
    assert [e["id"] for e in replay] == combined and end is not None
