"""/v1/fine_tuning/jobs in this process: refusals name the field and store and send nothing; OpenAI's request
shapes resolve to our method and hyperparameters; pages; an Idempotency-Key replays; a job accepted while the
broker is down. No worker runs here: each accepted job stays queued, and the test checks the one message the API
handed to the broker for it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, Message, chat_file, error_of
from tests.conftest import chat_lines
from tests.tiny_model import TINY_MODEL_ID

# Where a job on the tiny model that asks for no device class waits (app/services/training_queues.py).
TRAIN_QUEUE = f"train.any.{TINY_MODEL_ID}"


def trains(*job_ids: str) -> list[Message]:
    """The broker messages that hand these jobs to the training workers, in this order."""
    return [Message("adaptery.train", job_id, TRAIN_QUEUE) for job_id in job_ids]


@pytest.fixture(scope="module")
def training_file(client: TestClient) -> str:
    return chat_file(client, 32)


def create_job(client: TestClient, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return client.post("/v1/fine_tuning/jobs", json=body, **kwargs)


def job_ids(client: TestClient) -> list[str]:
    return [j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]]


def enqueued_at(job_id: str) -> float | None:
    """When the API handed the job to the broker (None: never; the reaper re-sends such a job)."""
    from app.db.models import FineTuningJob
    from app.db.session import session_scope

    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None, job_id
        return job.enqueued_at


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "no-such-model"}, 404, "model"),
    ({"training_file": "file-missing"}, 400, "training_file"),
    ({"validation_file": "file-missing"}, 400, "validation_file"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"r": 0}}}}, 400, "method.lora.hyperparameters.r"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"learning_rate": 5}}}}, 400,
     "method.lora.hyperparameters.learning_rate"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"target_modules": ["nope"]}}}}, 400,
     "method.lora.hyperparameters.target_modules"),
    ({"method": {"type": "adalora", "adalora": {"hyperparameters": {"init_r": 4, "target_r": 8}}}}, 400,
     "method.adalora.hyperparameters.target_r"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"rank": 8}}}}, 400, "method.lora.hyperparameters"),
    # OpenAI's dpo trains on preference pairs, not on this chat file; beta belongs to the dpo objective.
    ({"method": {"type": "dpo"}}, 400, "training_file"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"beta": 0.2}}}}, 400, "method.lora.hyperparameters.beta"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"gamma": 1}}}}, 400, "method.lora.hyperparameters.gamma"),
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"objective": "ppo"}}}}, 400,
     "method.lora.hyperparameters"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"objective": "supervised"}}}}, 400,
     "method.dpo.hyperparameters.objective"),
    ({"suffix": "../../etc"}, 400, "suffix"),
    ({"surprise": True}, 400, "surprise"),
    # Early stopping watches the validation loss: without a validation file it has nothing to watch.
    ({"method": {"type": "lora", "lora": {"hyperparameters": {"early_stopping_patience": 2}}}}, 400,
     "method.lora.hyperparameters.early_stopping_patience"),
    # Continuing from a model that does not exist (refusals that need a trained source stay in tests/e2e).
    ({"from_model": "ft:nope"}, 404, "from_model"),
])
def test_job_validation_names_the_field(api: Api, client: TestClient, training_file: str, body: dict[str, Any],
                                        status: int, param: str) -> None:
    full = {"model": TINY_MODEL_ID, "training_file": training_file, **body}
    before = job_ids(client)
    api.broker.take()
    response = create_job(client, full)
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == param
    assert job_ids(client) == before  # nothing stored
    assert api.broker.take() == []  # nothing sent


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in ("/v1/fine_tuning/jobs/ftjob-nope", "/v1/fine_tuning/jobs/ftjob-nope/events",
                 "/v1/files/file-nope", "/v1/models/ft:nope"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert error_of(response)["code"] in ("not_found", "model_not_found")
    assert client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404


# ------------------------------------------------------------------ accepted jobs


def test_openai_request_shapes_train_lora(api: Api, client: TestClient, training_file: str) -> None:
    shapes = [
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}}}},
        {"hyperparameters": {"n_epochs": 1, "batch_size": 16, "learning_rate_multiplier": 2}},
        {},
    ]
    api.broker.take()
    created = []
    for shape in shapes:
        response = create_job(client, {"model": TINY_MODEL_ID, "training_file": training_file, **shape})
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["method"]["type"] == "lora" and job["status"] == "queued" and job["queue"] == TRAIN_QUEUE
        created.append(job)
    for job in created[:2]:  # both OpenAI shapes carry their hyperparameters over to LoRA
        hyperparameters = job["method"]["lora"]["hyperparameters"]
        assert (hyperparameters["n_epochs"], hyperparameters["batch_size"]) == (1, 16)
        assert job["hyperparameters"] == hyperparameters
    default = create_job(client, {"model": TINY_MODEL_ID, "training_file": training_file}).json()
    assert default["hyperparameters"]["n_epochs"] == 3
    ids = [job["id"] for job in (*created, default)]
    lr = client.get(f"/v1/fine_tuning/jobs/{ids[1]}").json()["hyperparameters"]["learning_rate"]
    assert lr == pytest.approx(2e-3)  # the multiplier times LoRA's default 1e-3
    assert api.broker.take() == trains(*ids)  # one message each, in order, and nothing else

    listed = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert listed["has_more"] is True and len(listed["data"]) == 2
    assert [j["id"] for j in listed["data"]] == ids[:-3:-1]  # newest first
    assert listed["last_id"] == listed["data"][-1]["id"]
    following = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": listed["last_id"]}).json()
    assert [j["id"] for j in following["data"]] == [ids[1], ids[0]]
    assert not {j["id"] for j in following["data"]} & {j["id"] for j in listed["data"]}


def test_idempotency_key_replays_and_refuses_another_body(api: Api, client: TestClient, training_file: str) -> None:
    body = {"model": TINY_MODEL_ID, "training_file": training_file, "hyperparameters": {"n_epochs": 1}}
    key = {"Idempotency-Key": "job-key-1"}
    before = job_ids(client)
    api.broker.take()
    first = create_job(client, body, headers=key)
    again = create_job(client, body, headers=key)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers.get("idempotent-replayed") == "true"
    assert first.headers.get("idempotent-replayed") is None
    other = create_job(client, {**body, "suffix": "other"}, headers=key)
    assert other.status_code == 409 and error_of(other)["code"] == "idempotency_key_reused"
    assert job_ids(client) == [first.json()["id"], *before]  # one job stored
    assert api.broker.take() == trains(first.json()["id"])  # and handed to the broker once
    files_key = {"Idempotency-Key": "file-key-1"}
    uploads = [client.post("/v1/files", data={"purpose": "fine-tune"}, headers=files_key,
                           files={"file": ("a.jsonl", chat_lines(2).encode())}) for _ in range(2)]
    assert uploads[0].status_code == uploads[1].status_code == 200
    assert uploads[0].json()["id"] == uploads[1].json()["id"]


def test_a_job_is_accepted_while_the_broker_is_unreachable(api: Api, client: TestClient,
                                                           training_file: str) -> None:
    """Accepted all the same: stored as queued, never marked as sent (so the reaper re-sends it), with a
    warning event saying so; a job created once the broker is back is sent at once, with no warning."""
    api.broker.take()
    api.broker.reachable = False
    try:
        response = create_job(client, {"model": TINY_MODEL_ID, "training_file": training_file})
    finally:
        api.broker.reachable = True
    assert response.status_code == 200, response.text
    unsent = response.json()
    assert unsent["status"] == "queued"
    assert api.broker.take() == []
    assert enqueued_at(unsent["id"]) is None
    assert client.get(f"/v1/fine_tuning/jobs/{unsent['id']}").json()["status"] == "queued"
    events = client.get(f"/v1/fine_tuning/jobs/{unsent['id']}/events", params={"limit": 100}).json()["data"]
    warnings = [e for e in events if e["level"] == "warn"]
    assert len(warnings) == 1, events
    assert "queue is unreachable" in warnings[0]["message"] and "stays queued" in warnings[0]["message"]

    sent = create_job(client, {"model": TINY_MODEL_ID, "training_file": training_file}).json()
    assert api.broker.take() == trains(sent["id"])
    assert enqueued_at(sent["id"]) is not None
    events = client.get(f"/v1/fine_tuning/jobs/{sent['id']}/events", params={"limit": 100}).json()["data"]
    assert events and not [e for e in events if e["level"] == "warn"]
