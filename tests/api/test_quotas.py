"""Per-tenant quotas and fair training queues (issue 21, items 9 and 10), against the real app in this process
with small quotas: active evaluations, a default job time limit, jobs held in the database beyond a tenant's
in-flight count and handed over when one ends, stored files (count and bytes), adapters, and uploads and
downloads that stream instead of holding a whole file in memory."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.db.models import Adapter, FineTuningJob
from app.queue import TRAIN_TASK
from tests.api.conftest import Api, asgi_scope, in_process_api
from tests.api.test_limits import post_in_chunks
from tests.conftest import ADMIN_KEY, chat_lines, upload
from tests.tiny_model import TINY_MODEL_ID

IN_FLIGHT = 2
CREATIONS_PER_MINUTE = 6
MB = 2**20


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    with in_process_api(tmp_path_factory.mktemp("quotas"), tiny_model_dir, extra={
            "ADAPTERY_MAX_IN_FLIGHT_PER_TENANT": str(IN_FLIGHT),
            "ADAPTERY_MAX_ACTIVE_EVALUATIONS_PER_TENANT": "1",
            "ADAPTERY_DEFAULT_TIME_LIMIT_SECONDS": "3600",
            "ADAPTERY_MAX_FILES_PER_TENANT": "3",
            "ADAPTERY_MAX_STORAGE_MB_PER_TENANT": "30",
            "ADAPTERY_MAX_ADAPTERS_PER_TENANT": "2",
            "ADAPTERY_MAX_UPLOAD_MB": "64",
            "ADAPTERY_MAX_JOBS_CREATED_PER_MINUTE_PER_TENANT": str(CREATIONS_PER_MINUTE)}) as running:
        yield running


@pytest.fixture(scope="module")
def new_tenant(api: Api) -> Callable[[], tuple[str, str]]:
    """Makes a tenant: (its id, its key), so no other test's files, jobs or adapters count against it."""
    made = itertools.count()

    def make() -> tuple[str, str]:
        response = api.as_key(ADMIN_KEY).post("/v1/admin/tenants", json={"name": f"quota-{next(made)}"})
        assert response.status_code == 200, response.text
        return str(response.json()["id"]), str(response.json()["api_key"])

    return make


def create_job(client: Any, file_id: str, **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id, **extra})
    assert response.status_code == 200, response.text
    return dict(response.json())


def job_row(api: Api, job_id: str) -> FineTuningJob:
    with Session(create_engine(api.database_url)) as session:
        row = session.get(FineTuningJob, job_id)
        assert row is not None
        session.expunge(row)
        return row


# ---------------------------------------------------------------- item 9: training queues


def test_one_tenants_burst_does_not_run_before_another_tenants_first_job(
        api: Api, new_tenant: Callable[[], tuple[str, str]]) -> None:
    """Tenant A submits 5 jobs, then tenant B one: only IN_FLIGHT of A's reach the broker (FIFO), B's is sent at
    once, so a worker takes B's job third, not sixth. A's others wait in the database, queued, and are handed
    over one by one as A's jobs end: a cancelled held job is never sent."""
    from app import queue

    a = api.as_key(new_tenant()[1])
    b = api.as_key(new_tenant()[1])
    file_a, file_b = upload(a, chat_lines(4)).json()["id"], upload(b, chat_lines(4)).json()["id"]
    api.broker.take()
    burst = [create_job(a, file_a)["id"] for _ in range(5)]
    first_of_b = create_job(b, file_b)["id"]
    assert all(a.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] == "queued" for j in burst)
    assert [m.object_id for m in api.broker.take()] == burst[:IN_FLIGHT] + [first_of_b]

    # A held job cancelled: never sent. One of A's sent jobs ends: the oldest held one takes its place.
    assert a.post(f"/v1/fine_tuning/jobs/{burst[2]}/cancel").status_code == 200
    assert api.broker.take() == []
    assert a.post(f"/v1/fine_tuning/jobs/{burst[0]}/cancel").status_code == 200
    assert [(m.task, m.object_id) for m in api.broker.take()] == [(TRAIN_TASK, burst[3])]

    # The periodic sweep (every worker's reaper) keeps the limit and never sends a job twice at once.
    assert queue.send_held_training(burst[1]) == []
    assert api.broker.take() == []
    with Session(create_engine(api.database_url)) as session:
        from app.services import jobs

        resend = jobs.reap(session, max_attempts=3, requeue_after_seconds=3600)
    assert burst[4] in resend  # held: the reaper offers it, and the hand-over holds it back again
    for job_id in resend:
        queue.enqueue_training(job_id)
    assert api.broker.take() == []
    assert a.post(f"/v1/fine_tuning/jobs/{burst[1]}/cancel").status_code == 200
    assert [m.object_id for m in api.broker.take()] == [burst[4]]


def test_a_job_without_a_time_limit_gets_the_default(api: Api, new_tenant: Callable[[], tuple[str, str]]) -> None:
    client = api.as_key(new_tenant()[1])
    file_id = upload(client, chat_lines(4)).json()["id"]
    unbounded = job_row(api, create_job(client, file_id)["id"])
    assert unbounded.soft_time_limit == 3600 and unbounded.hard_time_limit is not None
    chosen = job_row(api, create_job(client, file_id, time_limit_seconds=60)["id"])
    assert chosen.soft_time_limit == 60


def test_job_creations_per_minute_per_tenant(api: Api, new_tenant: Callable[[], tuple[str, str]]) -> None:
    """Creating and cancelling jobs in a loop is bounded: past the tenant's creations in the last 60 s a job is
    refused (nothing stored), another tenant is not, and the window slides."""
    from sqlalchemy import func, update

    tenant_id, key = new_tenant()
    client, other = api.as_key(key), api.as_key(new_tenant()[1])
    file_id = upload(client, chat_lines(4)).json()["id"]
    for _ in range(CREATIONS_PER_MINUTE):  # each cancelled at once: the active-jobs limit is not what refuses
        assert client.post(f"/v1/fine_tuning/jobs/{create_job(client, file_id)['id']}/cancel").status_code == 200

    def stored() -> int:
        with Session(create_engine(api.database_url)) as session:
            return int(session.scalar(select(func.count()).select_from(FineTuningJob)
                                      .where(FineTuningJob.tenant_id == tenant_id)) or 0)

    refused = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id})
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "too_many_job_creations"
    assert "ADAPTERY_MAX_JOBS_CREATED_PER_MINUTE_PER_TENANT" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert stored() == CREATIONS_PER_MINUTE
    create_job(other, upload(other, chat_lines(4)).json()["id"])  # another tenant's first job

    with Session(create_engine(api.database_url)) as session:  # a minute later: the window has moved on
        session.execute(update(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
                        .values(created_at=FineTuningJob.created_at - 61))
        session.commit()
    create_job(client, file_id)
    assert stored() == CREATIONS_PER_MINUTE + 1


def test_active_evaluations_per_tenant(api: Api, new_tenant: Callable[[], tuple[str, str]]) -> None:
    client = api.as_key(new_tenant()[1])
    file_id = upload(client, chat_lines(4)).json()["id"]
    first = client.post("/v1/evaluations", json={"file": file_id, "models": [TINY_MODEL_ID]})
    assert first.status_code == 200, first.text
    second = client.post("/v1/evaluations", json={"file": file_id, "models": [TINY_MODEL_ID]})
    assert second.status_code == 429, second.text
    error = second.json()["error"]
    assert error["code"] == "too_many_active_evaluations"
    assert "ADAPTERY_MAX_ACTIVE_EVALUATIONS_PER_TENANT" in error["message"] and " 1 " in error["message"]
    assert int(second.headers["retry-after"]) > 0


# ---------------------------------------------------------------- item 10: storage


def test_files_per_tenant(api: Api, new_tenant: Callable[[], tuple[str, str]]) -> None:
    client = api.as_key(new_tenant()[1])
    ids = [upload(client, chat_lines(2)).json()["id"] for _ in range(3)]
    refused = upload(client, chat_lines(2))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_files"
    assert "ADAPTERY_MAX_FILES_PER_TENANT" in refused.json()["error"]["message"]
    assert client.delete(f"/v1/files/{ids[0]}").status_code == 200
    assert upload(client, chat_lines(2)).status_code == 200


def padded_file(size: int) -> Iterator[bytes]:
    """One valid example, then `size` bytes of blank lines in 64 KiB chunks: a file that is large on the wire but
    small once parsed, so what an upload holds in memory is the route's doing."""
    yield b'{"text": "hello"}\n'
    blank = (b" " * 1023 + b"\n") * 64
    for _ in range(size // len(blank)):
        yield blank


def test_uploads_and_downloads_stream_and_bytes_are_a_quota(api: Api,
                                                            new_tenant: Callable[[], tuple[str, str]]) -> None:
    """A 24 MB upload is accepted while the app allocates a fraction of it (the body goes to a temporary file,
    validation reads it line by line); its download is sent in chunks; the tenant's 30 MB of storage is then a
    limit a further 8 MB file passes."""
    _, key = new_tenant()
    tracemalloc.start()
    try:
        status, _, body = post_in_chunks(api.client.app, "/v1/files", key, "padded.jsonl", padded_file(24 * MB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 200, body
    assert peak < 8 * MB, f"{peak / MB:.0f} MB allocated while accepting a 24 MB upload"
    file_id = api.as_key(key).get("/v1/files").json()["data"][0]["id"]
    size = api.as_key(key).get(f"/v1/files/{file_id}").json()["bytes"]

    chunks = get_in_chunks(api.client.app, f"/v1/files/{file_id}/content", key)
    assert sum(chunks) == size and max(chunks) < size // 4, (len(chunks), max(chunks), size)

    status, _, body = post_in_chunks(api.client.app, "/v1/files", key, "more.jsonl", padded_file(8 * MB))
    assert status == 429 and b'"storage_quota_exceeded"' in body and b"ADAPTERY_MAX_STORAGE_MB_PER_TENANT" in body, \
        (status, body)
    assert len(api.as_key(key).get("/v1/files").json()["data"]) == 1


def get_in_chunks(app: Any, path: str, key: str) -> list[int]:
    """GET `path` from the ASGI app; the size of each body message it sends (nothing kept)."""
    scope = asgi_scope("GET", path, headers=[(b"authorization", f"Bearer {key}".encode())])
    sizes: list[int] = []
    status: list[int] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            await anyio.sleep(3600)  # the client never disconnects first
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and message.get("body"):
                sizes.append(len(message["body"]))

        await app(scope, receive, send)

    anyio.run(call)
    assert status == [200]
    return sizes


def test_adapters_per_tenant(api: Api, new_tenant: Callable[[], tuple[str, str]]) -> None:
    """At its adapter quota a tenant can neither import one nor start a job (which would make one); nothing that
    was accepted is failed for it."""
    tenant, key = new_tenant()
    client = api.as_key(key)
    file_id = upload(client, chat_lines(4)).json()["id"]
    with Session(create_engine(api.database_url)) as session:
        for n in range(2):
            session.add(Adapter(id=f"adapter-quota{tenant[-8:]}{n}", tenant_id=tenant, name=f"ft:quota:{tenant}:{n}",
                                base_model=TINY_MODEL_ID, method="lora", job_id=None))
        session.commit()
        assert len(list(session.scalars(select(Adapter).where(Adapter.tenant_id == tenant)))) == 2
    job = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id})
    assert job.status_code == 429 and job.json()["error"]["code"] == "too_many_adapters", job.text
    assert "ADAPTERY_MAX_ADAPTERS_PER_TENANT" in job.json()["error"]["message"]
    imported = client.post("/v1/adapters", files=[("files", ("adapter_config.json", b"{}")),
                                                  ("files", ("adapter_model.safetensors", b"x"))])
    assert imported.status_code == 429 and imported.json()["error"]["code"] == "too_many_adapters", imported.text
