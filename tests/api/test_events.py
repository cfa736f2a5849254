"""GET /v1/fine_tuning/jobs/{id}/events?stream=true in this process: what is wrong with a request is answered
before any stream starts, naming it. The job is cancelled while queued (no worker runs here), so it has finished:
a stream that did start would send its history and end at once rather than wait for events."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, chat_file, error_of, open_event_stream
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


N_STREAMS = 100


@pytest.mark.timeout(120)
def test_open_streams_hold_no_database_connection(api: Api, client: TestClient) -> None:
    """100 event streams stay open on a job that never finishes (queued: no worker runs here) while another request
    is answered at once, and between their polls the streams hold no pooled database connection (with one held per
    stream, the 16th would wait 30 s for the pool and fail, and every other request with it)."""
    import asyncio

    from app.db.session import get_engine
    from tests.conftest import TEST_KEY

    created = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client, 4)})
    assert created.status_code == 200, created.text
    path = f"/v1/fine_tuning/jobs/{created.json()['id']}/events"
    app = client.app

    async def scenario() -> tuple[int, float, int]:
        closing = asyncio.Event()
        first_events = [asyncio.Event() for _ in range(N_STREAMS)]
        statuses: list[int] = []

        def stream(index: int) -> asyncio.Task[None]:
            def on_message(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(int(message["status"]))
                if message["type"] == "http.response.body" and b"data:" in message.get("body", b""):
                    first_events[index].set()

            return open_event_stream(app, path, TEST_KEY, closing=closing, on_message=on_message)

        tasks = [stream(i) for i in range(N_STREAMS)]
        try:
            # About a second here; generous for a loaded machine.
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_events)), timeout=60)
            started = time.monotonic()
            answered = await asyncio.to_thread(client.get, "/v1/models")
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.3)
            held = get_engine().pool.checkedout()  # type: ignore[attr-defined]
            assert answered.status_code == 200, answered.text
            return len(statuses), elapsed, held
        finally:
            closing.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    opened, elapsed, held = asyncio.run(scenario())
    assert opened == N_STREAMS
    assert elapsed < 5, f"another request waited {elapsed:.1f} s behind 100 open streams"
    assert held <= 2, f"{held} pooled connections held while 100 streams wait between polls"


@pytest.mark.timeout(120)
def test_a_tenant_has_at_most_its_open_streams(api: Api, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ADAPTERY_MAX_OPEN_STREAMS_PER_TENANT a stream is a 429 naming it; another tenant is not counted, and
    a closed stream frees its place."""
    import asyncio

    from app.settings import get_settings
    from tests.conftest import ADMIN_KEY, TEST_KEY

    monkeypatch.setattr(get_settings(), "max_open_streams_per_tenant", 3)
    created = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client, 4)})
    path = f"/v1/fine_tuning/jobs/{created.json()['id']}/events"
    other_key = api.as_key(ADMIN_KEY).post("/v1/admin/tenants", json={"name": "streams-b"}).json()["api_key"]
    other = api.as_key(other_key)
    other_path = ("/v1/fine_tuning/jobs/" + other.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": chat_file(other, 4)}).json()["id"] + "/events")

    async def scenario() -> tuple[list[int], bytes, int]:
        closing = asyncio.Event()
        statuses: list[int] = []
        refused = b""

        def record(message: dict[str, Any]) -> None:
            nonlocal refused
            if message["type"] == "http.response.start":
                statuses.append(int(message["status"]))
            elif message["type"] == "http.response.body" and statuses[-1] == 429:
                refused += message.get("body", b"")

        first = [open_event_stream(client.app, path, TEST_KEY, closing=closing, on_message=record) for _ in range(3)]
        await asyncio.sleep(1)
        over = open_event_stream(client.app, path, TEST_KEY, closing=closing, on_message=record)
        await asyncio.wait_for(over, timeout=30)  # refused: it ends at once
        elsewhere = open_event_stream(client.app, other_path, other_key, closing=closing, on_message=record)
        await asyncio.sleep(1)
        first[0].cancel()  # a client that went away: its place is free again
        await asyncio.gather(first[0], return_exceptions=True)
        again = open_event_stream(client.app, path, TEST_KEY, closing=closing, on_message=record)
        await asyncio.sleep(1)
        closing.set()
        await asyncio.gather(*first[1:], elsewhere, again, return_exceptions=True)
        return statuses, refused, sum(1 for s in statuses if s == 200)

    statuses, refused, opened = asyncio.run(scenario())
    assert statuses.count(429) == 1 and opened == 5, statuses
    error = json.loads(refused)["error"]
    assert error["code"] == "too_many_open_streams" and "ADAPTERY_MAX_OPEN_STREAMS_PER_TENANT" in error["message"]
