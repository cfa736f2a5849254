"""Rate limits per key and the other limits and quotas, against the real app in this process, started with them
turned on (the rest of tests/api runs without a rate limit: its tests make more requests a minute than these
settings allow). The broker is not Redis here, so the app counts requests per key in this process
(app/services/rate_limit.py); the count shared by API replicas through Redis is the end-to-end tier's."""

from __future__ import annotations

import itertools
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from app.queue import TRAIN_TASK
from tests.api.conftest import Api, asgi_scope, in_process_api
from tests.conftest import ADMIN_KEY, chat_lines, upload
from tests.tiny_model import TINY_MODEL_ID

RATE_LIMIT_PER_MINUTE = 12


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    """This module's app: 12 requests a minute per key, uploads up to 1 MB, one unfinished job per tenant."""
    with in_process_api(tmp_path_factory.mktemp("limits"), tiny_model_dir, extra={
            "ADAPTERY_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT_PER_MINUTE), "ADAPTERY_MAX_UPLOAD_MB": "1",
            "ADAPTERY_MAX_ACTIVE_JOBS_PER_TENANT": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def fresh_key(api: Api) -> Callable[[], str]:
    """Makes the key of a new tenant: no other test's requests count against that key's limit, nor its jobs
    against that tenant's quota."""
    made = itertools.count()

    def make() -> str:
        response = api.as_key(ADMIN_KEY).post("/v1/admin/tenants", json={"name": f"tenant-{next(made)}"})
        assert response.status_code == 200, response.text
        return str(response.json()["api_key"])

    return make


def test_rate_limit_per_key(api: Api, fresh_key: Callable[[], str]) -> None:
    client, other = api.as_key(fresh_key()), api.as_key(fresh_key())
    within_one_window()
    responses = [client.get("/v1/files") for _ in range(RATE_LIMIT_PER_MINUTE + 4)]
    statuses = [r.status_code for r in responses]
    # A fixed one-minute window, which the burst does not straddle: 12 pass, the rest are refused.
    assert statuses == [200] * RATE_LIMIT_PER_MINUTE + [429] * 4, statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert other.get("/v1/files").status_code == 200  # another tenant's key is unaffected


def test_an_upload_over_its_limit_is_refused_unread(api: Api,
                                                    fresh_key: Callable[[], str]) -> None:
    """413, nothing stored, and the app's memory stays flat: the multipart parser spools the body to disk and the
    route refuses it by its size, never reading it into memory. The body is sent in 64 KiB chunks, as a server
    hands a request body to the app (the TestClient would hand over all 70 MB at once), and made as it is sent,
    so what the request allocates is the app's alone."""
    key = fresh_key()
    line = b'{"text": "x"}\n'
    chunk, n_chunks = line * (65536 // len(line)), 1100  # 70 MB
    tracemalloc.start()
    try:
        status, headers, body = post_in_chunks(api.client.app, "/v1/files", key, "big.jsonl",
                                               (chunk for _ in range(n_chunks)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413 and b'"file_too_large"' in body, (status, body)
    assert headers["content-type"] == "application/json"
    size_mb = len(chunk) * n_chunks / 2**20
    assert peak < 30 * 2**20, f"{peak / 2**20:.0f} MB allocated while refusing a {size_mb:.0f} MB upload"
    assert api.as_key(key).get("/v1/files").json()["data"] == []


def post_in_chunks(app: Any, path: str, key: str, filename: str,
                   content: Iterable[bytes]) -> tuple[int, dict[str, str], bytes]:
    """POST a multipart upload of `content` (one part, "file", and purpose=fine-tune) to the ASGI app, its body
    handed over chunk by chunk as a server does; the status, headers and body of the answer."""
    boundary = "adaptery-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    chunks = itertools.chain([head], content, [f"\r\n--{boundary}--\r\n".encode()])
    scope = asgi_scope("POST", path, headers=[(b"authorization", f"Bearer {key}".encode()),
                                              (b"content-type", f"multipart/form-data; boundary={boundary}".encode())])
    answer: dict[str, Any] = {"body": bytearray()}

    async def call() -> None:
        answered = anyio.Event()
        sent_all = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_all
            if sent_all:
                await answered.wait()
                return {"type": "http.disconnect"}
            chunk = next(chunks, None)
            if chunk is None:
                sent_all = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = {k.decode(): v.decode() for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    answered.set()

        await app(scope, receive, send)

    anyio.run(call)
    return answer["status"], answer["headers"], bytes(answer["body"])


def test_clients_cannot_set_what_the_server_decides(api: Api, fresh_key: Callable[[], str]) -> None:
    """Mass assignment: status, tenant and similar fields are not accepted from clients."""
    b = api.as_key(fresh_key())
    for field in ({"status": "succeeded"}, {"organization_id": "default"}, {"tenant_id": "default"},
                  {"fine_tuned_model": "ft:x"}):
        response = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": "f", **field})
        assert response.status_code == 400 and response.json()["error"]["param"] == next(iter(field)), response.text


def test_unfinished_jobs_per_tenant(api: Api, fresh_key: Callable[[], str]) -> None:
    b = api.as_key(fresh_key())
    file_id = upload(b, chat_lines(4)).json()["id"]
    api.broker.take()
    first = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id})
    assert first.status_code == 200 and first.json()["status"] == "queued", first.text  # no worker takes it here
    second = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id})
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_active_jobs", second.text
    assert int(second.headers["retry-after"]) > 0
    assert [(m.task, m.object_id) for m in api.broker.take()] == [(TRAIN_TASK, first.json()["id"])]
    # A finished (here: cancelled) job no longer counts.
    assert b.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel").status_code == 200
    third = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id})
    assert third.status_code == 200, third.text


def within_one_window(seconds: float = 5) -> None:
    """Wait, if need be, until the rate limit's one-minute window has `seconds` left at least: a burst sent now
    is counted in one window."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.1)
