"""GET /v1/fine_tuning/jobs/{id}/events?stream=true in this process: what is wrong with a request is answered
before any stream starts, naming it. The job is cancelled while queued (no worker runs here), so it has finished:
a stream that did start would send its history and end at once rather than wait for events."""

from __future__ import annotations

import json
import time

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


N_STREAMS = 100


def _stream_scope(path: str, key: str) -> dict[str, object]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"stream=true", "root_path": "",
            "headers": [(b"authorization", f"Bearer {key}".encode()), (b"host", b"testserver")],
            "client": ("127.0.0.1", 1), "server": ("testserver", 80)}


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
            requested = False

            async def receive() -> dict[str, object]:
                nonlocal requested
                if not requested:
                    requested = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await closing.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, object]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(int(message["status"]))  # type: ignore[call-overload]
                if message["type"] == "http.response.body" and b"data:" in message.get("body", b""):  # type: ignore[operator]
                    first_events[index].set()

            return asyncio.create_task(app(_stream_scope(path, TEST_KEY), receive, send))  # type: ignore[arg-type]

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
