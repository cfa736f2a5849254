"""GET /v1/fine_tuning/jobs/{id}/events?stream=true in this process: what is wrong with a request is answered
before any stream starts, naming it. The job is cancelled while queued (no worker runs here), so it has finished:
a stream that did start would send its history and end at once rather than wait for events."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, chat_file, error_of
from tests.tiny_model import TINY_MODEL_ID


def finished_job(client: TestClient) -> str:
    """A job cancelled while queued: finished, with a few events."""
    created = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client, 4)})
    assert created.status_code == 200, created.text
    cancelled = client.post(f"/v1/fine_tuning/jobs/{created.json()['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    return str(created.json()["id"])


def event_ids(client: TestClient, job_id: str) -> list[str]:
    """The job's event ids, oldest first."""
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    return [e["id"] for e in reversed(page["data"])]


@pytest.mark.timeout(60)  # a stream that should have been refused but started would otherwise wait here
def test_stream_errors_name_what_is_wrong(api: Api, client: TestClient) -> None:
    job_id, other_job = finished_job(client), finished_job(client)
    stream = {"stream": "true"}
    for wrong in ("ftevent-nope", event_ids(client, other_job)[0]):  # no such event; another job's event
        bad = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=stream, headers={"Last-Event-ID": wrong})
        assert bad.status_code == 400, bad.text
        error = error_of(bad)
        assert error["param"] == "Last-Event-ID" and wrong in error["message"], error
    missing = client.get("/v1/fine_tuning/jobs/ftjob-nope/events", params=stream)
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    refused = api.as_key(None).get(f"/v1/fine_tuning/jobs/{job_id}/events", params=stream)
    assert refused.status_code == 401, refused.text

    # The same request with an event of its own job streams the events after it, then the end.
    ids = event_ids(client, job_id)
    assert len(ids) >= 2
    resumed = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=stream, headers={"Last-Event-ID": ids[0]})
    assert resumed.status_code == 200 and resumed.headers["content-type"].startswith("text/event-stream")
    sent = [line.split(":", 1)[1].strip() for line in resumed.text.splitlines() if line.startswith("id:")]
    assert sent == ids[1:]
    data = [line.split(":", 1)[1].strip() for line in resumed.text.splitlines() if line.startswith("data:")]
    assert json.loads(data[-1]) == {"id": job_id, "status": "cancelled"}
