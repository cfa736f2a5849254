"""DELETE /v1/models/{model}, in this process: a tenant deletes its own fine-tuned model or imported adapter (OpenAI's
shape); it leaves /v1/models, chat, the engine and the store at once, its name is free again, a job's checkpoints go
with its final model unless kept, and it is refused for base models, other tenants' models and a model a running
job continues from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters.store import ArtifactStore
from app.db.models import Adapter
from tests.api.adapters_made_with_peft import files_of, save_lora, send_files
from tests.api.conftest import Api, chat_file, error_of
from tests.api.test_tenancy import chat, set_adapter
from tests.conftest import ADMIN_KEY
from tests.tiny_model import TINY_MODEL_ID


@pytest.fixture(scope="module")
def lora(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return files_of(save_lora(tiny_model_dir, tmp_path_factory.mktemp("lora")))


def imported(client: TestClient, lora: dict[str, bytes], name: str) -> str:
    response = send_files(client, lora, name=name)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def stored(adapter_id: str) -> bool:
    from app.settings import get_settings

    try:
        return ArtifactStore.for_settings(get_settings()).adapter_size(adapter_id) > 0
    except FileNotFoundError:
        return False


def residency(adapter_id: str) -> Any:
    from app.services.inference import engine_if_started

    engine = engine_if_started()
    return engine.runtime(TINY_MODEL_ID).adapters.residency(adapter_id) if engine is not None else None


def test_a_deleted_model_is_gone_everywhere_at_once_and_its_name_is_free(client: TestClient,
                                                                         lora: dict[str, bytes]) -> None:
    adapter_id = imported(client, lora, "to-delete")
    assert chat(client, "to-delete").status_code == 200
    assert residency(adapter_id) is not None and stored(adapter_id)
    assert client.post(f"/v1/adapters/{adapter_id}/pin").status_code == 200  # a pin does not keep it

    deleted = client.delete("/v1/models/to-delete")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": "to-delete", "object": "model", "deleted": True}
    assert chat(client, "to-delete").status_code == 404
    assert client.get("/v1/models/to-delete").status_code == 404
    assert "to-delete" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.get(f"/v1/adapters/{adapter_id}").status_code == 404
    assert residency(adapter_id) is None  # no request used it: dropped from the engine at once
    assert not stored(adapter_id)
    assert client.delete("/v1/models/to-delete").status_code == 404
    again = imported(client, lora, "to-delete")  # the name is free again
    assert again != adapter_id and chat(client, "to-delete").status_code == 200


def test_what_cannot_be_deleted_is_refused_naming_the_model(api: Api, client: TestClient,
                                                            lora: dict[str, bytes]) -> None:
    base = client.delete(f"/v1/models/{TINY_MODEL_ID}")
    assert base.status_code == 403 and error_of(base)["param"] == "model", base.text
    assert "DELETE /v1/admin/base_models" in error_of(base)["message"]
    assert client.delete("/v1/models/no-such-model").status_code == 404
    # Another tenant's model, even public, answers as a missing one.
    admin = api.as_key(ADMIN_KEY)
    tenant = admin.post("/v1/admin/tenants", json={"name": "lifecycle-b"}).json()
    adapter_id = imported(client, lora, "a-public-one")
    assert admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": True}).status_code == 200
    other = api.as_key(tenant["api_key"])
    for name in (adapter_id, "a-public-one"):
        assert other.delete(f"/v1/models/{name}").status_code == 404
    assert chat(other, adapter_id).status_code == 200  # still there for its owner and the public


def test_a_model_a_job_continues_from_is_kept_until_the_job_ends(api: Api, client: TestClient,
                                                                 lora: dict[str, bytes]) -> None:
    adapter_id = imported(client, lora, "a-base-for-more")
    first = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client)})
    set_adapter(adapter_id, job_id=first.json()["id"])  # as if trained here
    follow_up = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client),
                                                          "from_model": "a-base-for-more"})
    assert follow_up.status_code == 200, follow_up.text
    api.broker.take()
    refused = client.delete("/v1/models/a-base-for-more")
    assert refused.status_code == 409 and follow_up.json()["id"] in error_of(refused)["message"], refused.text
    assert chat(client, "a-base-for-more").status_code == 200
    assert client.post(f"/v1/fine_tuning/jobs/{follow_up.json()['id']}/cancel").status_code == 200
    assert client.delete("/v1/models/a-base-for-more").status_code == 200


def test_a_jobs_checkpoints_go_with_its_final_model_unless_kept(client: TestClient, lora: dict[str, bytes]) -> None:
    from app.db.models import FineTuningJob
    from app.db.session import session_scope

    for keep in (False, True):
        final, checkpoint = (imported(client, lora, f"final-{keep}"), imported(client, lora, f"ckpt-{keep}"))
        job = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client)})
        job_id = job.json()["id"]
        for adapter_id in (final, checkpoint):
            set_adapter(adapter_id, job_id=job_id)
        with session_scope() as session:
            row = session.get(FineTuningJob, job_id)
            assert row is not None
            row.fine_tuned_model = f"final-{keep}"
        query = "?keep_checkpoints=true" if keep else ""
        assert client.delete(f"/v1/models/final-{keep}{query}").status_code == 200
        assert (chat(client, f"ckpt-{keep}").status_code == 200) is keep
        with session_scope() as session:
            assert (session.get(Adapter, checkpoint).status == "ready") is keep  # type: ignore[union-attr]
        assert stored(checkpoint) is keep
