"""Preference data and preference jobs in this process: OpenAI's DPO file format and the feedback format (KTO) are
validated line by line (the line and the field named), a DPO job in OpenAI's request shape trains the default method
for the dpo objective (any method may train any objective), and each objective takes only its own format. No worker
runs: accepted jobs stay queued and the test checks the message handed to the broker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, chat_file, error_of
from tests.api.test_jobs import create_job, job_ids, trains
from tests.tiny_model import TINY_MODEL_ID


def pair(i: int, **changes: Any) -> dict[str, Any]:
    line = {"input": {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": f"Is {i} even?"}]},
            "preferred_output": [{"role": "assistant", "content": "Yes." if i % 2 == 0 else "No."}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot tell."}]}
    line.update(changes)
    return line


def upload(client: TestClient, lines: list[dict[str, Any]]) -> Any:
    body = "\n".join(json.dumps(line) for line in lines).encode()
    return client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("pairs.jsonl", body)})


@pytest.fixture(scope="module")
def pairs_file(client: TestClient) -> str:
    response = upload(client, [pair(i) for i in range(12)])
    assert response.status_code == 200, response.text
    stored = response.json()
    assert stored["n_examples"] == 12
    return str(stored["id"])


def test_a_preference_file_is_stored_with_its_format(client: TestClient, pairs_file: str) -> None:
    stored = client.get(f"/v1/files/{pairs_file}").json()
    assert stored["format"] == "preference" and stored["n_examples"] == 12


@pytest.mark.parametrize(("bad", "named"), [
    ({"input": {"messages": []}}, "input.messages must be a non-empty list"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}], "extra": 1}}, "input has unknown field(s) ['extra']"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}},
     "input.messages must end with a user (or tool) message"),
    ({"preferred_output": {"role": "assistant", "content": "Yes."}}, "'preferred_output' must be a list"),
    ({"non_preferred_output": [{"role": "user", "content": "Yes."}]}, "non_preferred_output[0] must be an assistant"),
    ({"non_preferred_output": [{"role": "assistant", "content": ""}]}, "non_preferred_output[0].content must be"),
    ({"non_preferred_output": [{"role": "assistant", "content": "Yes."}]}, "are the same answer"),
    ({"preferred_output": [{"role": "assistant", "content": "Yes.", "weight": 0}]}, "without weight"),
])
def test_a_bad_preference_line_is_named_with_its_field(client: TestClient, bad: dict[str, Any], named: str) -> None:
    response = upload(client, [pair(0), pair(2, **bad), pair(4)])
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "file" and "line 2:" in error["message"] and named in error["message"], error
    assert "line 1" not in error["message"] and "line 3" not in error["message"]


def test_a_dpo_job_in_openais_shape_trains_the_default_method_for_dpo(api: Api, client: TestClient,
                                                                       pairs_file: str) -> None:
    api.broker.take()
    response = create_job(client, {"model": TINY_MODEL_ID, "training_file": pairs_file, "validation_file": pairs_file,
                                   "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25,
                                                                                         "n_epochs": 2}}}})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"]["type"] == "lora"
    hyperparameters = job["method"]["lora"]["hyperparameters"]
    assert (hyperparameters["objective"], hyperparameters["beta"], hyperparameters["n_epochs"]) == ("dpo", 0.25, 2)
    assert job["hyperparameters"] == hyperparameters
    default = create_job(client, {"model": TINY_MODEL_ID, "training_file": pairs_file,
                                  "method": {"type": "dpo"}}).json()
    assert default["hyperparameters"]["beta"] == 0.1
    ia3 = create_job(client, {"model": TINY_MODEL_ID, "training_file": pairs_file,
                              "method": {"type": "ia3", "ia3": {"hyperparameters": {"objective": "dpo"}}}}).json()
    assert ia3["method"]["type"] == "ia3" and ia3["hyperparameters"]["objective"] == "dpo"
    simpo = create_job(client, {"model": TINY_MODEL_ID, "training_file": pairs_file, "method": {
        "type": "prompt_tuning", "prompt_tuning": {"hyperparameters": {"objective": "simpo", "gamma": 0.5}}}}).json()
    assert (simpo["hyperparameters"]["beta"], simpo["hyperparameters"]["gamma"]) == (2.0, 0.5)
    orpo = create_job(client, {"model": TINY_MODEL_ID, "training_file": pairs_file, "method": {
        "type": "lora", "lora": {"hyperparameters": {"objective": "orpo"}}}}).json()
    assert (orpo["hyperparameters"]["beta"], orpo["hyperparameters"]["gamma"]) == (0.1, None)
    refused = create_job(client, {"model": TINY_MODEL_ID, "training_file": pairs_file, "method": {
        "type": "dpo", "dpo": {"hyperparameters": {"gamma": 0.5}}}})
    assert refused.status_code == 400 and error_of(refused)["param"] == "method.dpo.hyperparameters.gamma"
    assert api.broker.take() == trains(job["id"], default["id"], ia3["id"], simpo["id"], orpo["id"])
    supervised = create_job(client, {"model": TINY_MODEL_ID, "training_file": chat_file(client, 8)}).json()
    assert supervised["hyperparameters"]["objective"] == "supervised" and supervised["hyperparameters"]["beta"] is None


def test_a_preference_file_is_refused_where_answers_are_needed(api: Api, client: TestClient,
                                                                pairs_file: str) -> None:
    before = job_ids(client)
    api.broker.take()
    for body in ({"model": TINY_MODEL_ID, "training_file": pairs_file},
                 {"model": TINY_MODEL_ID, "training_file": pairs_file,
                  "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1}}}},
                 {"model": TINY_MODEL_ID, "training_file": chat_file(client, 8), "validation_file": pairs_file,
                  "method": {"type": "dpo"}}):
        response = create_job(client, body)
        assert response.status_code == 400, response.text
        assert error_of(response)["param"] in ("training_file", "validation_file"), response.text
    assert job_ids(client) == before and api.broker.take() == []
    refused = client.post("/v1/evaluations", json={"file": pairs_file, "models": [TINY_MODEL_ID]})
    assert refused.status_code == 400 and error_of(refused)["param"] == "file", refused.text
    assert "for preference jobs" in error_of(refused)["message"]


def test_the_methods_catalogue_offers_the_objective(client: TestClient) -> None:
    methods = client.get("/v1/fine_tuning/methods").json()["data"]
    for method in methods:
        properties = method["hyperparameters"]["properties"]
        assert "objective" in properties and "beta" in properties, method["id"]
        assert method["defaults"]["objective"] == "supervised"


def feedback(i: int, **changes: Any) -> dict[str, Any]:
    line = {"input": {"messages": [{"role": "user", "content": f"Is {i} even?"}]},
            "output": [{"role": "assistant", "content": "Yes." if i % 2 == 0 else "Maybe."}], "label": i % 2 == 0}
    line.update(changes)
    return line


@pytest.mark.parametrize(("bad", "named"), [
    ({"label": "yes"}, "'label' must be true"),
    ({"output": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "'output' must be a list of exactly one"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}]}, "extra": 1}, "unknown field(s) ['extra']"),
])
def test_a_bad_feedback_line_is_named_with_its_field(client: TestClient, bad: dict[str, Any], named: str) -> None:
    response = upload(client, [feedback(0), feedback(1, **bad)])
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert "line 2:" in error["message"] and named in error["message"] and "line 1" not in error["message"], error


def test_a_kto_job_takes_a_feedback_file_and_no_other(api: Api, client: TestClient, pairs_file: str) -> None:
    stored = upload(client, [feedback(i) for i in range(10)])
    assert stored.status_code == 200, stored.text
    assert (stored.json()["format"], stored.json()["n_examples"]) == ("feedback", 10)
    file_id = stored.json()["id"]
    api.broker.take()
    job = create_job(client, {"model": TINY_MODEL_ID, "training_file": file_id, "method": {
        "type": "ia3", "ia3": {"hyperparameters": {"objective": "kto", "beta": 0.3}}}})
    assert job.status_code == 200, job.text
    assert (job.json()["hyperparameters"]["objective"], job.json()["hyperparameters"]["beta"]) == ("kto", 0.3)
    assert api.broker.take() == trains(job.json()["id"])
    for body in ({"method": {"type": "dpo"}},  # dpo trains on pairs
                 {"method": {"type": "lora", "lora": {"hyperparameters": {"objective": "kto"}}}, "training_file":
                  pairs_file},  # kto on feedback only
                 {}):  # a supervised job on feedback
        response = create_job(client, {"model": TINY_MODEL_ID, "training_file": file_id, **body})
        assert response.status_code == 400 and error_of(response)["param"] == "training_file", response.text
    assert api.broker.take() == []


def test_kto_needs_two_examples_a_batch_and_no_value_may_be_nan(api: Api, client: TestClient) -> None:
    file_id = upload(client, [feedback(i) for i in range(6)]).json()["id"]  # auto: batch_size 1 for 6 lines
    job = create_job(client, {"model": TINY_MODEL_ID, "training_file": file_id, "method": {
        "type": "lora", "lora": {"hyperparameters": {"objective": "kto"}}}})
    assert job.status_code == 200 and job.json()["hyperparameters"]["batch_size"] == 2, job.text
    refused = create_job(client, {"model": TINY_MODEL_ID, "training_file": file_id, "method": {
        "type": "lora", "lora": {"hyperparameters": {"objective": "kto", "batch_size": 1}}}})
    assert refused.status_code == 400 and error_of(refused)["param"] == "method.lora.hyperparameters.batch_size"
    from adapters.methods import METHODS, HyperparameterError
    from app.settings import Settings

    for name in ("beta", "gamma", "learning_rate"):
        raw = {"objective": "simpo", name: float("nan")}
        with pytest.raises(HyperparameterError) as caught:
            METHODS["lora"].resolve(raw, n_examples=6, settings=Settings(), base_info=api_base_info())
        assert caught.value.param == name and "finite" in str(caught.value)


def api_base_info() -> dict[str, Any]:
    from app.services import base_models
    from app.settings import get_settings

    settings = get_settings()
    return base_models.base_info(settings, base_models.resolve(settings, TINY_MODEL_ID))
