"""Before a body is read (app/request_guard.py): a request without a valid key is a 401 whatever it sends, a body
over its route's limit is a 413 that names the setting, and an address that keeps sending wrong keys is throttled.

"Unread" is measured at the ASGI boundary: these tests call the app with a `receive` that counts what it hands
over, which an HTTP client cannot show (FastAPI's TestClient sends the whole body before the app runs)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import Api, asgi_scope, error_of, in_process_api
from tests.conftest import ADMIN_KEY, TEST_KEY

FAILED_AUTH_PER_MINUTE = 5
_addresses = itertools.count(1)
BODY_KB = 64


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    extra = {"ADAPTERY_FAILED_AUTH_PER_MINUTE": str(FAILED_AUTH_PER_MINUTE),
             "ADAPTERY_MAX_REQUEST_BODY_KB": str(BODY_KB), "ADAPTERY_MAX_UPLOAD_MB": "1"}
    with in_process_api(tmp_path_factory.mktemp("guard"), tiny_model_dir, extra) as running:
        yield running


@dataclass
class Sent:
    """What one raw ASGI request got back, and how much of its body the app asked for."""

    status: int = 0
    body: bytes = b""
    chunks_read: int = 0
    bytes_read: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    def error(self) -> dict[str, Any]:
        import json

        return dict(json.loads(self.body)["error"])


def send_raw(api: Api, method: str, path: str, *, key: str | None, content_length: int | None,
             chunk: bytes = b"x" * 65536, chunks: int = 10_000, client: str | None = None) -> Sent:
    """One request straight into the app: its body is `chunks` pieces of `chunk`, handed over only when asked for.
    From `client`'s address, else from an address of its own (so wrong keys here count towards no throttle)."""
    client = client or f"192.0.2.{next(_addresses)}"
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = asgi_scope(method, path, headers=headers, client=client)
    sent = Sent()

    async def receive() -> dict[str, Any]:
        if sent.chunks_read >= chunks:
            await asyncio.sleep(3600)  # a client that stopped sending: the app must not be waiting here
        sent.chunks_read += 1
        sent.bytes_read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": sent.chunks_read < chunks}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.status = message["status"]
            sent.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            sent.body += message.get("body", b"")

    asyncio.run(asyncio.wait_for(api.client.app(scope, receive, send), timeout=60))  # type: ignore[arg-type]
    return sent


def test_a_body_without_a_valid_key_is_refused_unread(api: Api) -> None:
    huge = 50 * 2**30  # declares 50 GiB
    for key in (None, "sk-not-a-key"):
        for path in ("/v1/fine_tuning/jobs", "/v1/files", "/v1/adapters", "/v1/chat/completions"):
            sent = send_raw(api, "POST", path, key=key, content_length=huge)
            assert sent.status == 401, (key, path, sent)
            assert sent.chunks_read == 0, f"{path} read {sent.bytes_read} bytes of a body with no valid key"
            assert sent.error()["code"] == "invalid_api_key"
    # Without a declared length too: nothing is read.
    sent = send_raw(api, "POST", "/v1/fine_tuning/jobs", key=None, content_length=None)
    assert sent.status == 401 and sent.chunks_read == 0, sent
    # An admin route wants the admin key, before its body too; a tenant's key is not it.
    sent = send_raw(api, "POST", "/v1/admin/tenants", key=TEST_KEY, content_length=huge)
    assert sent.status == 401 and sent.chunks_read == 0, sent

    # Over HTTP: a malformed body without a key answers 401 (the key is what is wrong first), not 400.
    for headers in ({}, {"Authorization": "Bearer sk-not-a-key"}):
        answer = api.as_key(None).post("/v1/fine_tuning/jobs", content=b"{not json", headers=headers)
        assert answer.status_code == 401, answer.text
        assert error_of(answer)["code"] == "invalid_api_key"
    # With the key, the same body is the 400 it always was, and a good one works: the guard spares nothing else.
    assert api.client.post("/v1/fine_tuning/jobs", content=b"{not json").status_code == 400
    assert api.as_key(ADMIN_KEY).post("/v1/admin/tenants", json={"name": "guarded"}).status_code in (200, 201)


def test_bodies_over_their_route_limit_are_refused_naming_the_setting(api: Api) -> None:
    # A declared length over the limit: refused before a byte is read.
    sent = send_raw(api, "POST", "/v1/chat/completions", key=TEST_KEY, content_length=BODY_KB * 1024 + 1)
    assert sent.status == 413 and sent.chunks_read == 0, sent
    error = sent.error()
    assert error["code"] == "request_too_large" and "ADAPTERY_MAX_REQUEST_BODY_KB" in error["message"], error
    assert f"{BODY_KB} KB" in error["message"]
    sent = send_raw(api, "POST", "/v1/files", key=TEST_KEY, content_length=3 * 2**20)
    assert sent.status == 413 and sent.chunks_read == 0 and "ADAPTERY_MAX_UPLOAD_MB" in sent.error()["message"]

    # No declared length (chunked): reading stops at the first chunk past the limit, and the answer is the same.
    chunk = b" " * 4096
    sent = send_raw(api, "POST", "/v1/fine_tuning/jobs", key=TEST_KEY, content_length=None, chunk=chunk)
    assert sent.status == 413, sent
    assert sent.bytes_read <= BODY_KB * 1024 + len(chunk), f"read {sent.bytes_read} bytes past a {BODY_KB} KiB limit"
    assert sent.error()["code"] == "request_too_large" and "ADAPTERY_MAX_REQUEST_BODY_KB" in sent.error()["message"]

    # Under the limit, bodies go through as before.
    answer = api.client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert answer.status_code == 404, answer.text


def test_an_address_sending_wrong_keys_is_throttled(api: Api) -> None:
    address = "198.51.100.7"
    statuses = [send_raw(api, "POST", "/v1/fine_tuning/jobs", key=f"sk-wrong-{i}", content_length=2,
                         client=address).status for i in range(FAILED_AUTH_PER_MINUTE + 2)]
    if statuses[FAILED_AUTH_PER_MINUTE] == 401:  # the minute turned over mid-way: the count started again
        statuses = [send_raw(api, "POST", "/v1/fine_tuning/jobs", key="sk-wrong", content_length=2,
                             client=address).status for _ in range(FAILED_AUTH_PER_MINUTE + 2)]
    assert statuses[:FAILED_AUTH_PER_MINUTE] == [401] * FAILED_AUTH_PER_MINUTE, statuses
    assert statuses[FAILED_AUTH_PER_MINUTE:] == [429, 429], statuses
    refused = send_raw(api, "POST", "/v1/fine_tuning/jobs", key="sk-wrong", content_length=2, client=address)
    assert refused.error()["code"] == "too_many_failed_authentications"
    assert "ADAPTERY_FAILED_AUTH_PER_MINUTE" in refused.error()["message"] and int(refused.headers["retry-after"]) >= 1
    # Another address is not affected, nor are GET routes' answers to good keys from elsewhere.
    assert send_raw(api, "POST", "/v1/fine_tuning/jobs", key="sk-wrong", content_length=2,
                    client="198.51.100.8").status == 401
    assert api.client.get("/v1/models").status_code == 200
