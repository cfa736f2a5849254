"""/v1/evaluations in this process: refusals name the field and store and send nothing; unknown ids and cursors
are 404; pages are newest first; an Idempotency-Key replays; another tenant sees and uses nothing of ours but a
public adapter. The fine-tuned model is a LoRA made with PEFT and imported through the API (no worker runs here,
so no job trains one); each accepted evaluation stays queued, and the test checks its one broker message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, Message, chat_file, error_of
from tests.conftest import ADMIN_KEY, chat_lines, upload
from tests.tiny_model import TINY_MODEL_ID

VALID = chat_lines(6, start=100)
# Evaluations wait where training for their base model does, in the queue of no device class (app/queue.py).
EVALUATION_QUEUE = f"train.any.{TINY_MODEL_ID}"
ADAPTER = "evaluated-lora"


def evaluations_sent(*evaluation_ids: str) -> list[Message]:
    return [Message("adaptery.evaluate", evaluation_id, EVALUATION_QUEUE) for evaluation_id in evaluation_ids]


@pytest.fixture(scope="module")
def files(client: TestClient) -> dict[str, str]:
    return {"train": chat_file(client, 16), "valid": chat_file(client, 6, start=100)}


@pytest.fixture(scope="module")
def weights(client: TestClient, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The name of a fine-tuned model of the tiny model: a LoRA made with PEFT (random, non-zero weights),
    imported through the API."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    model.save_pretrained(folder)
    parts = [("files", (name, (folder / name).read_bytes()))
             for name in ("adapter_config.json", "adapter_model.safetensors")]
    response = client.post("/v1/adapters", data={"name": ADAPTER}, files=parts)
    assert response.status_code == 200, response.text
    assert response.json()["base_model"] == TINY_MODEL_ID
    return ADAPTER


def insert_file(*, purpose: str, status: str) -> str:
    """A file row of the local tenant the upload route cannot make (it accepts only processed fine-tune files)."""
    from app.db.models import File
    from app.db.session import session_scope

    file_id = f"file-{purpose.replace('-', '')}{status}"
    with session_scope() as session:
        if session.get(File, file_id) is None:
            session.add(File(id=file_id, tenant_id="default", filename="x.jsonl", purpose=purpose, bytes=1,
                             status=status, deleted=False))
            session.commit()
    return file_id


def evaluate(client: TestClient, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return client.post("/v1/evaluations", json=body, **kwargs)


def evaluation_ids(client: TestClient) -> list[str]:
    return [e["id"] for e in client.get("/v1/evaluations", params={"limit": 100}).json()["data"]]


# ------------------------------------------------------------------ refusals

Names = dict[str, str]
REFUSALS: list[tuple[str, Callable[[Names], dict[str, Any]], int, str, str]] = [
    # (case, body as a function of the module's names, status, param, code)
    ("unknown file", lambda n: {"file": "file-missing", "models": [TINY_MODEL_ID]}, 400, "file", "invalid_file"),
    ("wrong purpose", lambda n: {"file": n["assistants"], "models": [TINY_MODEL_ID]}, 400, "file", "invalid_file"),
    ("unprocessed file", lambda n: {"file": n["error"], "models": [TINY_MODEL_ID]}, 400, "file", "invalid_file"),
    ("unknown model", lambda n: {"file": n["valid"], "models": [TINY_MODEL_ID, "ft:nope"]}, 404, "models[1]",
     "model_not_found"),
    ("mixed base models", lambda n: {"file": n["valid"], "models": [n["weights"], "SmolLM2-135M-Instruct"]}, 400,
     "models[1]", "mixed_base_models"),
    ("no models", lambda n: {"file": n["valid"], "models": []}, 400, "models", "invalid_request"),
    ("nine models", lambda n: {"file": n["valid"], "models": [f"m{i}" for i in range(9)]}, 400, "models",
     "invalid_request"),
    ("duplicate", lambda n: {"file": n["valid"], "models": [TINY_MODEL_ID, n["weights"], TINY_MODEL_ID]}, 400,
     "models[2]", "duplicate_model"),
    ("the same base model by its alias", lambda n: {"file": n["valid"], "models": [
        "SmolLM2-135M-Instruct", "smollm2-135m-instruct"]}, 400, "models[1]", "duplicate_model"),
    ("empty model name", lambda n: {"file": n["valid"], "models": [""]}, 400, "models[0]", "invalid_request"),
    ("unknown field", lambda n: {"file": n["valid"], "models": [TINY_MODEL_ID], "surprise": 1}, 400, "surprise",
     "invalid_request"),
    # Graders: each refusal names the grader's field.
    ("a template naming neither item nor sample", lambda n: graded(n, {**EXACT, "input": "{{answer}}"}), 400,
     "graders[0].string_check.input", "invalid_request"),
    ("a sample field that does not exist", lambda n: graded(n, {**EXACT, "reference": "{{sample.output_json}}"}),
     400, "graders[0].string_check.reference", "invalid_request"),
    ("an unknown operation", lambda n: graded(n, {**EXACT, "operation": "regex"}), 400,
     "graders[0].string_check.operation", "invalid_request"),
    ("an unknown similarity metric", lambda n: graded(n, {**BLEU, "evaluation_metric": "meteor"}), 400,
     "graders[0].text_similarity.evaluation_metric", "invalid_request"),
    ("code in a formula", lambda n: graded(n, {**MULTI, "calculate_output": "__import__('os').getpid()"}), 400,
     "graders[0].multi", "invalid_request"),
    ("a formula naming no grader", lambda n: graded(n, {**MULTI, "calculate_output": "exact + judge"}), 400,
     "graders[0].multi", "invalid_request"),
    ("a grader named as a function", lambda n: graded(n, {**MULTI, "graders": {"max": EXACT}}), 400,
     "graders[0].multi", "invalid_request"),
    ("two graders of one name", lambda n: graded(n, EXACT, EXACT), 400, "graders", "invalid_request"),
    ("an unknown scoring model", lambda n: graded(n, {**SCORE, "model": "ft:nope"}), 404, "graders[0].model",
     "model_not_found"),
    ("a scoring model on another base model", lambda n: graded(n, {**SCORE, "model": "SmolLM2-135M-Instruct"}),
     400, "graders[0].model", "mixed_base_models"),
    ("an unknown scoring model in a multi grader", lambda n: graded(n, {**MULTI, "graders": {
        "exact": EXACT, "judge": {**SCORE, "model": "ft:nope"}}, "calculate_output": "exact + judge"}), 404,
     "graders[0].graders.judge.model", "model_not_found"),
    ("a range upside down", lambda n: graded(n, {**SCORE, "range": [1, 0]}), 400, "graders[0].score_model",
     "invalid_request"),
    ("sampling with a temperature", lambda n: graded(n, {**SCORE, "sampling_params": {"temperature": 0.7}}), 400,
     "graders[0].score_model.sampling_params.temperature", "invalid_request"),
    ("nine graders", lambda n: graded(n, *({**EXACT, "name": f"g{i}"} for i in range(9))), 400, "graders",
     "invalid_request"),
]

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
         "reference": "{{item.reference_answer}}", "operation": "eq"}
BLEU = {"type": "text_similarity", "name": "bleu", "input": "{{sample.output_text}}",
        "reference": "{{item.messages[-1].content}}", "evaluation_metric": "bleu", "pass_threshold": 0.3}
SCORE = {"type": "score_model", "name": "judge", "model": TINY_MODEL_ID, "range": [0, 10], "input": [
    {"role": "developer", "content": "Score the answer from 0 to 10."},
    {"role": "user", "content": "Question: {{item.messages[0].content}}\nAnswer: {{sample.output_text}}"}]}
MULTI = {"type": "multi", "name": "overall", "graders": {"exact": EXACT, "rouge": {**BLEU, "evaluation_metric":
                                                                                     "rouge_l"}},
         "calculate_output": "0.5 * exact + 0.5 * rouge"}


def graded(names: Names, *graders: dict[str, Any]) -> dict[str, Any]:
    return {"file": names["valid"], "models": [TINY_MODEL_ID], "graders": list(graders)}


# The three refusals of a file say which of its faults it is (a row of the local tenant's, inserted above).
FILE_FAULTS = {"unknown file": "does not exist", "wrong purpose": "purpose 'assistants'",
               "unprocessed file": "not processed"}


@pytest.mark.parametrize(("case", "body", "status", "param", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_field(api: Api, client: TestClient, files: dict[str, str], weights: str, case: str,
                                 body: Callable[[Names], dict[str, Any]], status: int, param: str,
                                 code: str) -> None:
    names = {**files, "weights": weights, "assistants": insert_file(purpose="assistants", status="processed"),
             "error": insert_file(purpose="fine-tune", status="error")}
    before = evaluation_ids(client)
    api.broker.take()
    response = evaluate(client, body(names))
    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["param"], error["code"]) == (param, code), error
    if param.startswith("models["):
        assert "models" in error["message"] or "model" in error["message"]
    if case in FILE_FAULTS:
        assert FILE_FAULTS[case] in error["message"], error
    assert evaluation_ids(client) == before  # nothing stored
    assert api.broker.take() == []  # nothing sent


def test_graders_are_stored_as_sent_and_their_scoring_models_resolved(api: Api, client: TestClient,
                                                                      files: dict[str, str], weights: str) -> None:
    """Every grader type is accepted and echoed as sent (defaults filled in); a score_model grader may score with
    a fine-tuned model of the evaluation's base model, which the worker will apply."""
    from app.db.models import Evaluation
    from app.db.session import session_scope

    judge = {**SCORE, "model": weights}
    api.broker.take()
    response = evaluate(client, {"file": files["valid"], "models": [TINY_MODEL_ID, weights],
                                 "graders": [EXACT, BLEU, judge, MULTI]})
    assert response.status_code == 200, response.text
    evaluation = response.json()
    assert [g["name"] for g in evaluation["graders"]] == ["exact", "bleu", "judge", "overall"]
    assert evaluation["graders"][0] == EXACT and evaluation["graders"][3]["graders"]["exact"] == EXACT
    assert evaluation["graders"][2]["sampling_params"] == {"max_completions_tokens": 16, "temperature": None}
    assert api.broker.take() == evaluations_sent(evaluation["id"])
    with session_scope() as session:
        stored = session.get(Evaluation, evaluation["id"])
        assert stored is not None and stored.grading is not None
        scorers = stored.grading["scorers"]
    assert len(scorers) == 1 and scorers[0]["model"] == weights and scorers[0]["adapter_id"] is not None
    plain = evaluate(client, {"file": files["valid"], "models": [TINY_MODEL_ID]}).json()
    assert plain["graders"] is None


def test_unknown_ids_and_cursors_are_404(client: TestClient) -> None:
    for path, params in (("/v1/evaluations/eval-nope", {}), ("/v1/evaluations", {"after": "eval-nope"})):
        response = client.get(path, params=params)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found", path


# ------------------------------------------------------------------ pages, idempotency, tenants


def test_pages_newest_first_and_idempotency(api: Api, client: TestClient, files: dict[str, str]) -> None:
    body = {"file": files["valid"], "models": [TINY_MODEL_ID]}
    api.broker.take()
    created = []
    for _ in range(3):
        response = evaluate(client, body)
        assert response.status_code == 200, response.text
        evaluation = response.json()
        assert evaluation["id"].startswith("eval-") and evaluation["object"] == "evaluation"
        assert (evaluation["status"], evaluation["results"], evaluation["finished_at"]) == ("queued", None, None)
        assert (evaluation["file"], evaluation["models"], evaluation["base_model"]) == \
            (files["valid"], [TINY_MODEL_ID], TINY_MODEL_ID)
        created.append(evaluation["id"])
    key = {"Idempotency-Key": "evaluation-key-1"}
    first, again = evaluate(client, body, headers=key), evaluate(client, body, headers=key)
    assert first.status_code == again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    other = evaluate(client, {**body, "metadata": {"x": "y"}}, headers=key)
    assert other.status_code == 409 and error_of(other)["code"] == "idempotency_key_reused"
    created.append(first.json()["id"])
    assert api.broker.take() == evaluations_sent(*created)  # one message each; the replay sent none

    everything = client.get("/v1/evaluations", params={"limit": 100}).json()["data"]
    assert [e["id"] for e in everything[:4]] == created[::-1]
    assert [e["created_at"] for e in everything] == sorted((e["created_at"] for e in everything), reverse=True)
    pages, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/evaluations", params=params).json()
        assert len(page["data"]) <= 2
        pages += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            break
        assert page["last_id"] == page["data"][-1]["id"]
        after = page["last_id"]
    assert pages == [e["id"] for e in everything] and len(pages) >= 4
    for evaluation_id in created:  # no worker runs here
        assert client.get(f"/v1/evaluations/{evaluation_id}").json()["status"] == "queued"


@pytest.fixture(scope="module")
def admin(api: Api) -> TestClient:
    return api.as_key(ADMIN_KEY)


@pytest.fixture(scope="module")
def tenant_b(api: Api, admin: TestClient) -> TestClient:
    created = admin.post("/v1/admin/tenants", json={"name": "evaluations-b"})
    assert created.status_code == 200, created.text
    return api.as_key(created.json()["api_key"])


def test_another_tenant_sees_and_uses_nothing(api: Api, client: TestClient, admin: TestClient,
                                              tenant_b: TestClient, files: dict[str, str], weights: str) -> None:
    assert evaluate(client, {"file": files["valid"], "models": [TINY_MODEL_ID, weights]}).status_code == 200
    own = client.get("/v1/evaluations", params={"limit": 100}).json()["data"]
    assert own
    for evaluation in own:
        missing = tenant_b.get(f"/v1/evaluations/{evaluation['id']}")
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
        assert tenant_b.get("/v1/evaluations", params={"after": evaluation["id"]}).status_code == 404
    assert tenant_b.get("/v1/evaluations").json()["data"] == []
    # Naming A's file or A's model answers exactly as naming ones that do not exist.
    b_file = upload(tenant_b, VALID).json()["id"]
    api.broker.take()
    pairs = [({"file": files["valid"], "models": [TINY_MODEL_ID]}, {"file": "file-missing", "models": [TINY_MODEL_ID]}),
             ({"file": b_file, "models": [weights]}, {"file": b_file, "models": ["ft:does-not-exist"]})]
    for as_a, as_missing in pairs:
        got, expected = evaluate(tenant_b, as_a), evaluate(tenant_b, as_missing)
        assert got.status_code == expected.status_code and got.status_code in (400, 404)
        assert error_of(got)["param"] == error_of(expected)["param"]
    assert api.broker.take() == []
    # A public adapter may be evaluated by everyone, by its id (names are per tenant).
    adapter_id = next(a["id"] for a in client.get("/v1/adapters").json()["data"] if a["name"] == weights)
    assert admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": True}).status_code == 200
    try:
        accepted = evaluate(tenant_b, {"file": b_file, "models": [TINY_MODEL_ID, adapter_id]})
    finally:
        assert admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": False}).status_code == 200
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "queued"
    assert api.broker.take() == evaluations_sent(accepted.json()["id"])
    assert [e["id"] for e in tenant_b.get("/v1/evaluations").json()["data"]] == [accepted.json()["id"]]
    assert accepted.json()["id"] not in evaluation_ids(client)
    # Private again: B may not name it any more.
    refused = evaluate(tenant_b, {"file": b_file, "models": [TINY_MODEL_ID, adapter_id]})
    assert refused.status_code == 404 and error_of(refused)["param"] == "models[1]"


def test_a_job_grades_its_end_report_with_the_graders_it_names(api: Api, client: TestClient,
                                                               files: dict[str, str]) -> None:
    """A job may name graders for its end report: they are stored and echoed; they need a validation file, a
    supervised objective, and a score_model grader that scores with the job's base model (the worker holds no
    other). Each refusal names the field and stores nothing."""
    from tests.api.test_jobs import create_job, job_ids

    body = {"model": TINY_MODEL_ID, "training_file": files["train"], "validation_file": files["valid"]}
    api.broker.take()
    accepted = create_job(client, {**body, "graders": [EXACT, SCORE]})
    assert accepted.status_code == 200, accepted.text
    assert [g["name"] for g in accepted.json()["graders"]] == ["exact", "judge"]
    assert len(api.broker.take()) == 1
    assert create_job(client, body).json()["graders"] is None
    api.broker.take()
    before = job_ids(client)
    for changes, param in (
            ({"validation_file": None, "graders": [EXACT]}, "graders"),
            ({"graders": [{**SCORE, "model": "SmolLM2-135M-Instruct"}]}, "graders[0].model"),
            ({"graders": [EXACT, {**MULTI, "graders": {"judge": {**SCORE, "model": "ft:nope"}},
                                  "calculate_output": "judge"}]}, "graders[1].model"),
            ({"graders": [EXACT, EXACT]}, "graders"),
            ({"graders": [{**EXACT, "name": f"g{i}"} for i in range(5)]}, "graders"),
            ({"graders": [{**BLEU, "evaluation_metric": "meteor"}]}, "graders[0].text_similarity.evaluation_metric")):
        refused = create_job(client, {**body, **changes})
        assert refused.status_code == 400 and error_of(refused)["param"] == param, refused.text
    assert job_ids(client) == before and api.broker.take() == []
