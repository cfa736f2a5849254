"""Names and tenants, in this process: adapter names are each tenant's own (another tenant's name is neither taken
nor an oracle), `ft:` names are the service's, a bare name resolves only within the caller's tenant and another
tenant's public adapter is addressed by its id, public adapters show nothing of their owner, and `from_model`
continues only the caller's own models (a public adapter may be used, not exported by training on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.db.models import DEFAULT_TENANT, Adapter
from tests.api.adapters_made_with_peft import files_of, save_lora, send_files
from tests.api.conftest import Api, chat_file, error_of
from tests.conftest import ADMIN_KEY
from tests.tiny_model import TINY_MODEL_ID

SHARED = "shared-name"


@pytest.fixture(scope="module")
def admin(api: Api) -> TestClient:
    return api.as_key(ADMIN_KEY)


def _tenant(admin: TestClient, name: str) -> tuple[str, str]:
    response = admin.post("/v1/admin/tenants", json={"name": name})
    assert response.status_code == 200, response.text
    return str(response.json()["id"]), str(response.json()["api_key"])


@pytest.fixture(scope="module")
def tenant_b(admin: TestClient) -> tuple[str, str]:
    return _tenant(admin, "tenant-b")


@pytest.fixture(scope="module")
def tenant_c(admin: TestClient) -> tuple[str, str]:
    return _tenant(admin, "tenant-c")


@pytest.fixture(scope="module")
def lora(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return files_of(save_lora(tiny_model_dir, tmp_path_factory.mktemp("lora")))


@pytest.fixture(scope="module")
def shared(api: Api, client: TestClient, tenant_b: tuple[str, str], lora: dict[str, bytes]) -> dict[str, str]:
    """Tenants A (the local tenant) and B each import an adapter under the same name: {tenant: adapter id}."""
    ids = {}
    for tenant, as_tenant in ((DEFAULT_TENANT, client), (tenant_b[0], api.as_key(tenant_b[1]))):
        imported = send_files(as_tenant, lora, name=SHARED)
        assert imported.status_code == 200, imported.text
        ids[tenant] = imported.json()["id"]
    return ids


def chat(as_tenant: TestClient, model: str) -> Any:
    return as_tenant.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]})


def resolved(tenant: str, model: str) -> str | None:
    """The adapter id `model` resolves to for this tenant (None: a base model), as every inference route does."""
    from app.db.session import session_scope
    from app.services.inference import resolve_model
    from app.settings import get_settings

    with session_scope() as session:
        target = resolve_model(session, tenant_id=tenant, settings=get_settings(), name=model)
        return target.adapter.id if target.adapter is not None else None


def set_adapter(adapter_id: str, **values: Any) -> None:
    from app.db.session import session_scope

    with session_scope() as session:
        adapter = session.get(Adapter, adapter_id)
        assert adapter is not None
        for key, value in values.items():
            setattr(adapter, key, value)


def test_ft_names_are_reserved_for_fine_tuned_models(client: TestClient, lora: dict[str, bytes]) -> None:
    before = client.get("/v1/adapters").json()["data"]
    for name in (f"ft:{TINY_MODEL_ID}:abcd1234", "FT:mine"):
        refused = send_files(client, lora, name=name)
        assert refused.status_code == 400, refused.text
        assert error_of(refused)["param"] == "name" and "ft:" in error_of(refused)["message"]
    assert client.get("/v1/adapters").json()["data"] == before  # nothing stored


def test_names_are_per_tenant(api: Api, client: TestClient, tenant_b: tuple[str, str], tenant_c: tuple[str, str],
                              shared: dict[str, str], lora: dict[str, bytes]) -> None:
    b = api.as_key(tenant_b[1])
    # Taken is taken within one's own tenant only: another tenant's name is no oracle.
    again = send_files(client, lora, name=SHARED)
    assert again.status_code == 409 and error_of(again)["code"] == "name_taken"
    # Each tenant's bare name is its own adapter, wherever inference, /v1/models or /v1/adapters resolves it.
    for tenant, as_tenant in ((DEFAULT_TENANT, client), (tenant_b[0], b)):
        assert resolved(tenant, SHARED) == shared[tenant]
        answered = chat(as_tenant, SHARED)
        assert answered.status_code == 200 and answered.json()["model"] == SHARED, answered.text
        assert as_tenant.get(f"/v1/models/{SHARED}").status_code == 200
        assert as_tenant.get(f"/v1/adapters/{SHARED}").json()["id"] == shared[tenant]
    # A third tenant has no adapter of that name: it answers as any missing model.
    c = api.as_key(tenant_c[1])
    assert chat(c, SHARED).status_code == 404 and error_of(chat(c, SHARED))["param"] == "model"
    assert c.get(f"/v1/models/{SHARED}").status_code == 404


def test_public_adapters_are_addressed_by_id_and_hide_their_owner(
        api: Api, client: TestClient, admin: TestClient, tenant_b: tuple[str, str], tenant_c: tuple[str, str],
        shared: dict[str, str]) -> None:
    c = api.as_key(tenant_c[1])
    job = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client)})
    assert job.status_code == 200, job.text
    set_adapter(shared[DEFAULT_TENANT], job_id=job.json()["id"])  # as if A had trained it here
    for adapter_id in shared.values():
        assert admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": True}).status_code == 200
    try:
        # Two tenants publish the same name: a bare name is never another tenant's, so it is not ambiguous.
        assert chat(c, SHARED).status_code == 404
        assert resolved(tenant_b[0], SHARED) == shared[tenant_b[0]]
        # A public adapter is addressed by its id, which /v1/models lists as the model's id.
        for adapter_id in shared.values():
            assert resolved(tenant_c[0], adapter_id) == adapter_id
            answered = chat(c, adapter_id)
            assert answered.status_code == 200 and answered.json()["model"] == adapter_id, answered.text
        assert resolved(tenant_b[0], shared[DEFAULT_TENANT]) == shared[DEFAULT_TENANT]
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert set(shared.values()) <= set(listed) and SHARED not in listed
        # Nothing of the owner shows: no tenant id, no job id.
        for adapter_id in shared.values():
            for shown in (listed[adapter_id], c.get(f"/v1/models/{adapter_id}").json()):
                assert shown["owned_by"] not in (DEFAULT_TENANT, tenant_b[0]) and shown["job_id"] is None, shown
        # The owner still sees its own by name, with its job.
        own = client.get(f"/v1/models/{SHARED}").json()
        assert own["id"] == SHARED and own["job_id"] == job.json()["id"]
    finally:
        for adapter_id in shared.values():
            admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": False})
    assert chat(c, shared[DEFAULT_TENANT]).status_code == 404  # private again: its id is like a missing one


def test_from_model_continues_only_the_callers_own_models(
        api: Api, client: TestClient, admin: TestClient, tenant_b: tuple[str, str], lora: dict[str, bytes]) -> None:
    imported = send_files(client, lora, name="a-trained")
    assert imported.status_code == 200, imported.text
    adapter_id = imported.json()["id"]
    a_job = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client)})
    assert a_job.status_code == 200, a_job.text
    set_adapter(adapter_id, job_id=a_job.json()["id"])  # as if A had trained it here
    assert admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": True}).status_code == 200
    b = api.as_key(tenant_b[1])
    b_file = chat_file(b)
    api.broker.take()
    try:
        missing = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": b_file,
                                                        "from_model": "ft:does-not-exist"})
        assert missing.status_code == 404 and error_of(missing)["param"] == "from_model"
        # B may not train on A's public adapter (that would export it): by its id or by A's name, it answers as a
        # missing model does.
        for name in (adapter_id, "a-trained"):
            refused = b.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": b_file,
                                                            "from_model": name})
            assert refused.status_code == 404, refused.text
            assert {k: v for k, v in error_of(refused).items() if k != "message"} == \
                {k: v for k, v in error_of(missing).items() if k != "message"}
        assert b.get("/v1/fine_tuning/jobs").json()["data"] == [] and api.broker.take() == []
        assert chat(b, adapter_id).status_code == 200  # though B may use it
        # The owner continues its own.
        own = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client),
                                                         "from_model": "a-trained"})
        assert own.status_code == 200 and own.json()["from_model"] == "a-trained", own.text
    finally:
        admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": False})


def test_public_adapters_show_nothing_of_their_owner(api: Api, client: TestClient, admin: TestClient,
                                                     tenant_c: tuple[str, str], lora: dict[str, bytes]) -> None:
    imported = send_files(client, lora, name="a-public")
    assert imported.status_code == 200, imported.text
    adapter_id = imported.json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client)})
    set_adapter(adapter_id, job_id=job.json()["id"])  # as if A had trained it here
    assert admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": True}).status_code == 200
    try:
        c = api.as_key(tenant_c[1])
        listed = [m for m in c.get("/v1/models").json()["data"] if m["id"] in (adapter_id, "a-public")]
        assert len(listed) == 1
        shown = [listed[0], c.get(f"/v1/models/{listed[0]['id']}").json()]
        for model in shown:  # neither A's tenant id nor its job id: only what using the model needs
            assert model["owned_by"] != DEFAULT_TENANT and model["job_id"] is None, model
            assert DEFAULT_TENANT not in model.values() and job.json()["id"] not in model.values()
    finally:
        admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": False})
