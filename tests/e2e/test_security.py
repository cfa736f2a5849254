"""API keys, admin routes, and tenant isolation: a BOLA matrix generated from the app's own OpenAPI
document, so every route with an id is checked, including routes added later."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.budgets import HTTP_REQUEST, budget
from tests.conftest import ADMIN_KEY, TEST_KEY, Stack, chat_lines, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID

PUBLIC = {"/health", "/ready"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def http(base_url: str, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers=bearer(key) if key else None, timeout=budget(HTTP_REQUEST))


@pytest.fixture(scope="module")
def tenant_b(stack: Stack) -> str:
    with http(stack.base_url, ADMIN_KEY) as admin:
        response = admin.post("/v1/admin/tenants", json={"name": "tenant-b"})
    assert response.status_code == 200, response.text
    return response.json()["api_key"]


@pytest.fixture(scope="module")
def owned_by_a(client: httpx.Client) -> Iterator[dict[str, str]]:
    """Tenant A (the local tenant) owns a file, a finished job, its adapter and model name, an evaluation and a
    webhook endpoint."""
    file_id = upload(client, chat_lines(8)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id, "hyperparameters": {"n_epochs": 1}}).json()
    done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    adapter = next(a for a in client.get("/v1/adapters").json()["data"] if a["name"] == done["fine_tuned_model"])
    event = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1}).json()["data"][0]
    evaluation = client.post("/v1/evaluations", json={"file": file_id, "models": [done["fine_tuned_model"]]})
    assert evaluation.status_code == 200, evaluation.text
    webhook = client.post("/v1/webhooks", json={"url": "http://10.1.2.3:9/hook"})
    assert webhook.status_code == 200, webhook.text
    yield {"file_id": file_id, "fine_tuning_job_id": job["id"], "adapter_id": adapter["id"],
           "model_id": done["fine_tuned_model"], "event_id": event["id"], "evaluation_id": evaluation.json()["id"],
           "webhook_id": webhook.json()["id"]}
    # The test database is shared by every module's stack: no endpoint of this tenant outlives the module.
    client.delete(f"/v1/webhooks/{webhook.json()['id']}")


def test_keys_are_required_and_checked(stack: Stack) -> None:
    with http(stack.base_url) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for headers in ({}, bearer("sk-ady-wrong"), {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}):
            response = anonymous.get("/v1/models", headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/v1/models", headers=bearer(TEST_KEY)).status_code == 200
        # The local tenant's key is not an admin key, and the admin key is not a tenant key.
        assert anonymous.get("/v1/admin/tenants", headers=bearer(TEST_KEY)).status_code == 401
        assert anonymous.get("/v1/models", headers=bearer(ADMIN_KEY)).status_code == 401


def test_admin_manages_tenants_and_keys(stack: Stack) -> None:
    with http(stack.base_url, ADMIN_KEY) as admin:
        tenant = admin.post("/v1/admin/tenants", json={"name": "acme"}).json()
        assert tenant["api_key"].startswith("sk-ady-") and tenant["name"] == "acme"
        listed = admin.get("/v1/admin/tenants").json()["data"]
        assert tenant["id"] in [t["id"] for t in listed] and all("api_key" not in t for t in listed)
        second = admin.post(f"/v1/admin/tenants/{tenant['id']}/keys").json()
        assert second["api_key"] != tenant["api_key"] and second["prefix"] == second["api_key"][:10]
        assert admin.post("/v1/admin/tenants/tenant-missing/keys").status_code == 404
        with http(stack.base_url) as user:
            assert user.get("/v1/files", headers=bearer(second["api_key"])).status_code == 200
            revoked = admin.delete(f"/v1/admin/keys/{second['id']}").json()
            assert revoked["revoked_at"] is not None
            assert user.get("/v1/files", headers=bearer(second["api_key"])).status_code == 401
            assert user.get("/v1/files", headers=bearer(tenant["api_key"])).status_code == 200
        assert admin.post("/v1/admin/tenants", json={"name": ""}).status_code == 400


def _routes(app_openapi: dict[str, Any]) -> list[tuple[str, str]]:
    return [(path, method.upper()) for path, item in app_openapi["paths"].items() for method in item
            if path not in PUBLIC and not path.startswith("/v1/admin")]


def _fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(?::path)?\}", lambda m: ids[m.group(1)], path)


def _body(method: str, path: str, ids: dict[str, str]) -> dict[str, Any] | None:
    if method != "POST":
        return None
    if path == "/v1/fine_tuning/jobs":
        return {"model": TINY_MODEL_ID, "training_file": ids["file_id"]}
    if path == "/v1/chat/completions":
        return {"model": ids["model_id"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if path == "/v1/completions":
        return {"model": ids["model_id"], "prompt": "hi", "max_tokens": 2}
    if path == "/v1/evaluations":
        return {"file": ids["file_id"], "models": [ids["model_id"]]}
    return None


def test_bola_matrix_from_the_openapi_document(stack: Stack, client: httpx.Client, tenant_b: str,
                                               owned_by_a: dict[str, str]) -> None:
    a_client = client
    with httpx.Client(base_url=stack.base_url, headers=bearer(tenant_b), timeout=budget(60)) as b_client:
        spec = a_client.get("/openapi.json").json()
        missing = {key: value.split("-")[0] + "-doesnotexist" if value.startswith(("file", "ftjob", "adapter"))
                   else "ft:does-not-exist" for key, value in owned_by_a.items()}
        checked = []
        for path, method in _routes(spec):
            if path in ("/v1/files", "/v1/adapters", "/v1/webhooks") and method == "POST":
                continue  # uploads and endpoints: create the caller's own object; nothing of A's is named
            body = _body(method, path, owned_by_a)
            url = _fill(path, owned_by_a)
            as_b = b_client.request(method, url, json=body, params={"limit": 100})
            if "{" in path:
                assert as_b.status_code == 404, (method, path, as_b.status_code, as_b.text)
                assert as_b.json()["error"]["code"] in ("not_found", "model_not_found")
            elif body is not None:
                # Naming A's object in a body must look exactly like naming one that does not exist.
                as_missing = b_client.request(method, path, json=_body(method, path, missing))
                assert as_b.status_code >= 400, (method, path, as_b.text)
                assert (as_b.status_code, as_b.json()["error"]["param"]) == \
                       (as_missing.status_code, as_missing.json()["error"]["param"]), (method, path, as_missing.text)
            else:
                assert as_b.status_code == 200, (method, path, as_b.text)
                assert not set(owned_by_a.values()) & set(re.findall(r'"(?:id|name)":"([^"]+)"', as_b.text)), path
            checked.append((method, path))
        # Every route with an id in its path was exercised (new routes join the matrix by themselves).
        with_ids = {(m, p) for p, m in _routes(spec) if "{" in p}
        assert with_ids <= set(checked) and len(with_ids) >= 12
        # Tenant A still sees all of its own.
        assert a_client.get(f"/v1/files/{owned_by_a['file_id']}").status_code == 200
        assert a_client.get(f"/v1/fine_tuning/jobs/{owned_by_a['fine_tuning_job_id']}").status_code == 200
        assert a_client.get(f"/v1/adapters/{owned_by_a['adapter_id']}").status_code == 200
        assert a_client.get(f"/v1/models/{owned_by_a['model_id']}").status_code == 200
        assert a_client.get(f"/v1/evaluations/{owned_by_a['evaluation_id']}").status_code == 200
        assert a_client.get(f"/v1/webhooks/{owned_by_a['webhook_id']}/deliveries").status_code == 200


def test_rate_limit_per_key_and_other_limits(tmp_path: Any, tiny_model_dir: Any, redis_url: str,
                                             database_url: str) -> None:
    from tests.conftest import make_stack

    own = make_stack(tmp_path, database_url=database_url, broker_url=redis_url, tiny_model_dir=tiny_model_dir,
                     extra={"ADAPTERY_RATE_LIMIT_PER_MINUTE": "12", "ADAPTERY_MAX_UPLOAD_MB": "1",
                            "ADAPTERY_MAX_ACTIVE_JOBS_PER_TENANT": "1"})
    own.start_api()
    try:
        own.wait_ready_http()
        with http(own.base_url, ADMIN_KEY) as admin:
            other_key = admin.post("/v1/admin/tenants", json={"name": "other"}).json()["api_key"]
            third_key = admin.post("/v1/admin/tenants", json={"name": "third"}).json()["api_key"]
        with http(own.base_url, TEST_KEY) as a, \
                http(own.base_url, other_key) as b, \
                http(own.base_url, third_key) as c:
            responses = [a.get("/v1/files") for _ in range(16)]
            statuses = [r.status_code for r in responses]
            # A fixed one-minute window: at most 12 pass per window (two windows if the burst straddles one).
            assert 429 in statuses and statuses.count(200) <= 24, statuses
            limited = next(r for r in responses if r.status_code == 429)
            assert limited.json()["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(limited.headers["retry-after"]) <= 60
            assert b.get("/v1/files").status_code == 200  # another tenant's key is unaffected
            b = c  # the rest uses a third key, so the 12-a-minute limit does not get in the way
            # Upload size: refused with 413, nothing stored, and the API's memory stays flat (the body is
            # spooled to disk by the multipart parser and refused by its size, never read into memory).
            rss_before = _rss_mb(own.processes["api"].pid)
            big = b.post("/v1/files", data={"purpose": "fine-tune"},
                         files={"file": ("big.jsonl", b'{"text": "x"}\n' * 5_000_000)})  # 70 MB
            assert big.status_code == 413 and big.json()["error"]["code"] == "file_too_large"
            assert _rss_mb(own.processes["api"].pid) - rss_before < 30
            assert b.get("/v1/files").json()["data"] == []
            # Mass assignment: status, tenant and similar fields are not accepted from clients.
            for field in ({"status": "succeeded"}, {"organization_id": "default"}, {"tenant_id": "default"},
                          {"fine_tuned_model": "ft:x"}):
                response = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": "f", **field})
                assert response.status_code == 400 and response.json()["error"]["param"] == next(iter(field))
            # Unfinished jobs per tenant (no worker runs here, so the first stays queued).
            file_id = b.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("t.jsonl", chat_lines(4).encode())}).json()["id"]
            first = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id})
            assert first.status_code == 200
            second = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id})
            assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_active_jobs"
            b.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel")
    finally:
        own.stop_all()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_admin_can_make_an_adapter_public(stack: Stack, tenant_b: str, owned_by_a: dict[str, str]) -> None:
    model = owned_by_a["model_id"]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=stack.base_url, headers=bearer(tenant_b), timeout=budget(60)) as b, \
            http(stack.base_url, ADMIN_KEY) as admin:
        assert b.post("/v1/chat/completions", json=chat).status_code == 404
        marked = admin.post(f"/v1/admin/adapters/{owned_by_a['adapter_id']}/visibility", json={"public": True})
        assert marked.status_code == 200 and marked.json()["public"] is True
        assert b.post("/v1/chat/completions", json=chat).status_code == 200
        assert model in [m["id"] for m in b.get("/v1/models").json()["data"]]
        # Using is shared; managing and downloading stay with the owner.
        assert b.get(f"/v1/adapters/{owned_by_a['adapter_id']}/content").status_code == 404
        assert b.post(f"/v1/adapters/{owned_by_a['adapter_id']}/pin").status_code == 404
        admin.post(f"/v1/admin/adapters/{owned_by_a['adapter_id']}/visibility", json={"public": False})
        assert b.post("/v1/chat/completions", json=chat).status_code == 404
