"""API keys, admin routes, and tenant isolation, against the real app in this process: a BOLA matrix generated from
the app's own OpenAPI document, so every route with an id is checked, including routes added later.

Tenant A's objects are made through the API, as a client makes them: a file (uploaded), a fine-tuning job and an
evaluation (created; no worker runs in this tier, so both stay queued, real objects with real ids and events), an
adapter and its model name (a LoRA made with PEFT, imported) and a webhook endpoint. The rate limit and the other
limits and quotas need an app with other settings: tests/api/test_limits.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.queue import EVALUATE_TASK, TRAIN_TASK
from tests.api.adapters_made_with_peft import files_of, save_lora, send_files
from tests.api.conftest import Api
from tests.conftest import ADMIN_KEY, TEST_KEY, chat_lines, upload
from tests.tiny_model import TINY_MODEL_ID

PUBLIC = {"/health", "/ready"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def admin(api: Api) -> TestClient:
    return api.as_key(ADMIN_KEY)


@pytest.fixture(scope="module")
def tenant_b(admin: TestClient) -> str:
    response = admin.post("/v1/admin/tenants", json={"name": "tenant-b"})
    assert response.status_code == 200, response.text
    return str(response.json()["api_key"])


@pytest.fixture(scope="module")
def owned_by_a(api: Api, client: TestClient, tmp_path_factory: pytest.TempPathFactory,
               tiny_model_dir: Path) -> dict[str, str]:
    """Tenant A (the local tenant) owns a file, a queued job and its events, an imported adapter and its model
    name, a queued evaluation and a webhook endpoint."""
    uploaded = upload(client, chat_lines(8))
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id, "hyperparameters": {"n_epochs": 1}})
    assert job.status_code == 200 and job.json()["status"] == "queued", job.text
    job_id = job.json()["id"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1}).json()["data"]
    assert events, "a created job has events"
    imported = send_files(client, files_of(save_lora(tiny_model_dir, tmp_path_factory.mktemp("tenant-a"))))
    assert imported.status_code == 200, imported.text
    adapter = imported.json()
    evaluation = client.post("/v1/evaluations", json={"file": file_id, "models": [adapter["name"]]})
    assert evaluation.status_code == 200, evaluation.text
    webhook = client.post("/v1/webhooks", json={"url": "http://10.1.2.3:9/hook"})
    assert webhook.status_code == 200, webhook.text
    alias = client.put("/v1/aliases/a-alias", json={"model": adapter["name"]})
    assert alias.status_code == 200, alias.text
    # Both queued objects were handed to the broker (and stay queued: no worker takes them in this tier).
    assert [(m.task, m.object_id) for m in api.broker.take()] == [
        (TRAIN_TASK, job_id), (EVALUATE_TASK, evaluation.json()["id"])]
    return {"file_id": file_id, "fine_tuning_job_id": job_id, "adapter_id": adapter["id"],
            "model_id": adapter["name"], "event_id": events[0]["id"], "evaluation_id": evaluation.json()["id"],
            "webhook_id": webhook.json()["id"], "alias": alias.json()["id"]}


def test_keys_are_required_and_checked(api: Api) -> None:
    anonymous = api.as_key(None)
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


def test_admin_manages_tenants_and_keys(api: Api, admin: TestClient) -> None:
    tenant = admin.post("/v1/admin/tenants", json={"name": "acme"}).json()
    assert tenant["api_key"].startswith("sk-ady-") and tenant["name"] == "acme"
    listed = admin.get("/v1/admin/tenants").json()["data"]
    assert tenant["id"] in [t["id"] for t in listed] and all("api_key" not in t for t in listed)
    second = admin.post(f"/v1/admin/tenants/{tenant['id']}/keys").json()
    assert second["api_key"] != tenant["api_key"] and second["prefix"] == second["api_key"][:10]
    assert admin.post("/v1/admin/tenants/tenant-missing/keys").status_code == 404
    user = api.as_key(None)
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
    if method == "PUT" and path == "/v1/aliases/{alias}":
        return {"model": ids["model_id"]}  # B pointing A's alias at A's model
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


def test_bola_matrix_from_the_openapi_document(api: Api, client: TestClient, tenant_b: str,
                                               owned_by_a: dict[str, str]) -> None:
    a_client = client
    # An unhandled error is the 500 an HTTP client would get, and fails the matrix like any other status.
    b_client = api.as_key(tenant_b, raise_server_exceptions=False)
    spec = a_client.get("/openapi.json").json()
    missing = {key: value.split("-")[0] + "-doesnotexist" if value.startswith(("file", "ftjob", "adapter"))
               else "ft:does-not-exist" for key, value in owned_by_a.items()}
    checked = []
    for path, method in _routes(spec):
        if path in ("/v1/files", "/v1/adapters", "/v1/webhooks", "/v1/feedback") and method == "POST":
            continue  # uploads, endpoints, feedback: the caller's own objects; nothing of A's is named (test_feedback)
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
    # B's requests created nothing of A's to work on: no job or evaluation was handed to the broker.
    assert api.broker.take() == []
    # Tenant A still sees all of its own.
    assert a_client.get(f"/v1/files/{owned_by_a['file_id']}").status_code == 200
    assert a_client.get(f"/v1/fine_tuning/jobs/{owned_by_a['fine_tuning_job_id']}").status_code == 200
    assert a_client.get(f"/v1/adapters/{owned_by_a['adapter_id']}").status_code == 200
    assert a_client.get(f"/v1/models/{owned_by_a['model_id']}").status_code == 200
    assert a_client.get(f"/v1/evaluations/{owned_by_a['evaluation_id']}").status_code == 200
    assert a_client.get(f"/v1/webhooks/{owned_by_a['webhook_id']}/deliveries").status_code == 200


def test_admin_can_make_an_adapter_public(api: Api, admin: TestClient, tenant_b: str,
                                          owned_by_a: dict[str, str]) -> None:
    model = owned_by_a["model_id"]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    b = api.as_key(tenant_b)
    assert b.post("/v1/chat/completions", json=chat).status_code == 404
    marked = admin.post(f"/v1/admin/adapters/{owned_by_a['adapter_id']}/visibility", json={"public": True})
    assert marked.status_code == 200 and marked.json()["public"] is True
    # Names are per tenant: B addresses A's public adapter by its id, which /v1/models lists as its model id.
    assert b.post("/v1/chat/completions", json=chat).status_code == 404
    by_id = {**chat, "model": owned_by_a["adapter_id"]}
    answered = b.post("/v1/chat/completions", json=by_id)
    assert answered.status_code == 200, answered.text
    assert answered.json()["model"] == owned_by_a["adapter_id"]
    listed = [m["id"] for m in b.get("/v1/models").json()["data"]]
    assert owned_by_a["adapter_id"] in listed and model not in listed
    # Using is shared; managing and downloading stay with the owner.
    assert b.get(f"/v1/adapters/{owned_by_a['adapter_id']}/content").status_code == 404
    assert b.post(f"/v1/adapters/{owned_by_a['adapter_id']}/pin").status_code == 404
    admin.post(f"/v1/admin/adapters/{owned_by_a['adapter_id']}/visibility", json={"public": False})
    assert b.post("/v1/chat/completions", json=by_id).status_code == 404
