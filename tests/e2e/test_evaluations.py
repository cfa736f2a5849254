"""On-demand evaluations end to end: real HTTP, a real Celery worker on Redis, PostgreSQL, the tiny model.

One stack and two fine-tuned models (a weight method and a prompt-learning one) are shared by the module.
The worker's numbers are checked against the same metric functions run here, in this process, on a freshly
loaded base model per adapter, so applying and removing adapters one after another in the worker changes
nothing; refusals name the field; another tenant sees nothing; recovery goes through the reaper.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from adapters.methods import DEFAULT_METHOD, METHODS
from tests.budgets import JOB_DONE, budget
from tests.conftest import ADMIN_KEY, Stack, chat_lines, running_stack, upload, wait_for_status
from tests.e2e.test_api import adapter_folder
from tests.tiny_model import TINY_MODEL_ID

TRAIN = chat_lines(16)
VALID = chat_lines(6, start=100)
# A prompt-learning method whose saved adapter is not what it trains (the encoder's output, not the encoder).
PROMPT_METHOD = "p_tuning"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
          database_url: str) -> Iterator[Stack]:
    """The usual API + worker, with a reaper that runs every second (the recovery test waits for it)."""
    with running_stack(tmp_path_factory.mktemp("evaluations"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra={"ADAPTERY_REAPER_INTERVAL_SECONDS": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def files(client: httpx.Client) -> dict[str, str]:
    ids = {}
    for name, content in (("train", TRAIN), ("valid", VALID)):
        response = upload(client, content)
        assert response.status_code == 200, response.text
        ids[name] = response.json()["id"]
    return ids


@pytest.fixture(scope="module")
def trained(client: httpx.Client, stack: Stack, files: dict[str, str]) -> dict[str, Any]:
    """A default-method job (with a validation file) and a prompt-learning job, both succeeded."""
    jobs = {}
    for method in (DEFAULT_METHOD, PROMPT_METHOD):
        hyperparameters = {"n_epochs": 3, "batch_size": 4,
                           "learning_rate": min(0.1, 20 * METHODS[method].default_learning_rate)}
        response = client.post("/v1/fine_tuning/jobs", json={
            "model": TINY_MODEL_ID, "training_file": files["train"], "validation_file": files["valid"], "seed": 3,
            "method": {"type": method, method: {"hyperparameters": hyperparameters}}})
        assert response.status_code == 200, response.text
        jobs[method] = response.json()["id"]
    done = {}
    for method, job_id in jobs.items():
        job = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", f"{job}\n{stack.log_tail('worker')}"
        done[method] = job
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{jobs[DEFAULT_METHOD]}/checkpoints").json()["data"]
    return {"jobs": done, "weights": done[DEFAULT_METHOD]["fine_tuned_model"],
            "prompt": done[PROMPT_METHOD]["fine_tuned_model"],
            "checkpoint": checkpoints[-1]["fine_tuned_model_checkpoint"]}


@pytest.fixture(scope="module")
def tenant_b(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        key = admin.post("/v1/admin/tenants", json={"name": "evaluations-b"}).json()["api_key"]
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"},
                      timeout=budget(60)) as b:
        yield b


def evaluate(client: httpx.Client, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return client.post("/v1/evaluations", json=body, **kwargs)


def wait_for_evaluation(client: httpx.Client, evaluation_id: str, timeout: float = JOB_DONE) -> dict[str, Any]:
    deadline = time.monotonic() + budget(timeout)
    evaluation: dict[str, Any] = {}
    while time.monotonic() < deadline:
        evaluation = client.get(f"/v1/evaluations/{evaluation_id}").json()
        if evaluation["status"] in ("succeeded", "failed"):
            return evaluation
        time.sleep(0.3)
    raise TimeoutError(f"evaluation {evaluation_id} still {evaluation.get('status')}: {evaluation}")


def reference_metrics(stack: Stack, tiny_model_dir: Path, tokenizer: Any, content: str,
                      folders: list[Path | None]) -> list[dict[str, Any]]:
    """The same metric functions, here: a freshly loaded base model for each model, the compute dtype and
    thread count the worker uses, and batches of the worker's size."""
    import torch
    from peft import PeftModel

    from adapters.base_models import load_model, resolve_device
    from adapters.compute import compute_plan
    from adapters.data import encode_dataset, parse_jsonl
    from adapters.methods import for_config
    from app.settings import Settings
    from workers.evaluator import BATCH_SIZE
    from workers.training.evaluation import model_metrics
    from workers.training.loop import BatchMaker, accelerator_for, trainable_examples

    settings = Settings()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stack's ADAPTERY_TORCH_THREADS: the worker's probe and its arithmetic
    try:
        plan = compute_plan(resolve_device("auto"), "auto", stack.data_dir)  # the worker's cached plan
        max_len = settings.max_seq_length_limit
        examples = trainable_examples(encode_dataset(tokenizer, parse_jsonl(content.encode(), max_examples=1000)),
                                      max_len)
        found = []
        for folder in folders:
            base = load_model(str(tiny_model_dir), device="auto", dtype=plan.dtype)
            common: dict[str, Any] = {
                "base_model": base, "tokenizer": tokenizer, "examples": examples, "batch_size": BATCH_SIZE,
                "autocast": accelerator_for(plan.dtype, next(base.parameters()).device).autocast,
                "exact_match_examples": settings.exact_match_examples}
            if folder is None:
                found.append(model_metrics(base, make=BatchMaker.for_base_model(
                    max_len=max_len, pad_id=tokenizer.pad_token_id), **common))
                continue
            config = json.loads((folder / "adapter_config.json").read_text())
            make = BatchMaker.for_saved_adapter(for_config(config), config, max_len=max_len,
                                                pad_id=tokenizer.pad_token_id)
            found.append(model_metrics(PeftModel.from_pretrained(base, str(folder)), make=make, **common))
        return found
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ results


def test_models_compared_on_a_validation_file(client: httpx.Client, stack: Stack, tiny_model_dir: Path,
                                              tiny_tokenizer: Any, files: dict[str, str],
                                              trained: dict[str, Any]) -> None:
    models = [TINY_MODEL_ID, trained["weights"], trained["prompt"], trained["checkpoint"]]
    response = evaluate(client, {"file": files["valid"], "models": models, "metadata": {"case": "valid"}})
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["id"].startswith("eval-") and created["object"] == "evaluation"
    assert created["status"] == "queued" and created["finished_at"] is None
    assert created["results"] is None and created["error"] is None
    assert (created["file"], created["models"], created["base_model"], created["metadata"]) == \
        (files["valid"], models, TINY_MODEL_ID, {"case": "valid"})

    done = wait_for_evaluation(client, created["id"])
    assert done["status"] == "succeeded", f"{done}\n{stack.log_tail('worker')}"
    assert done["finished_at"] >= done["created_at"] and done["error"] is None
    results = done["results"]
    assert [r["model"] for r in results] == models
    for result in results:
        assert 0 < result["loss"] < 50 and 0 <= result["mean_token_accuracy"] <= 1
        assert result["exact_match"] is not None and 0 <= result["exact_match"] <= 1
        assert result["exact_match_examples"] == 6  # every validation example has a prompt
    assert len({r["tokens"] for r in results}) == 1 and results[0]["tokens"] > 6
    assert results[1]["loss"] < results[0]["loss"]  # the fine-tuned model learned the answer

    # The worker applied and removed each adapter on one base model; the same functions on a fresh base
    # model per adapter give the same numbers (P-tuning's saved encoder output included).
    folders = [None, *(adapter_folder(stack, name) for name in models[1:])]
    expected = reference_metrics(stack, tiny_model_dir, tiny_tokenizer, VALID, folders)
    for result, reference in zip(results, expected, strict=True):
        assert {k: v for k, v in result.items() if k != "model"} == pytest.approx(reference, abs=2e-6), \
            result["model"]

    # Where the jobs report their own end-of-training metrics on this validation file, computed on the model in
    # training memory (for P-tuning: the prompt encoder itself, not its saved output), they agree too (their
    # batches differ in size, so up to rounding in the compute dtype: one token of 42 for the accuracy).
    for method, index in ((DEFAULT_METHOD, 1), (PROMPT_METHOD, 2)):
        report = trained["jobs"][method].get("result") or {}
        if "full_valid_loss" not in report:
            continue
        for mine, theirs in ((results[index], report), (results[0], report["base_model"])):
            assert theirs["full_valid_loss"] == pytest.approx(mine["loss"], rel=1e-3), method
            assert theirs["full_valid_mean_token_accuracy"] == pytest.approx(mine["mean_token_accuracy"], abs=0.03)


def test_the_adapter_beats_the_base_model_on_its_training_file(client: httpx.Client, files: dict[str, str],
                                                                trained: dict[str, Any]) -> None:
    models = [trained["weights"], TINY_MODEL_ID]  # results follow the order given, not base first
    done = wait_for_evaluation(client, evaluate(client, {"file": files["train"], "models": models}).json()["id"])
    assert done["status"] == "succeeded", done
    tuned, base = done["results"]
    assert (tuned["model"], base["model"]) == tuple(models)
    assert tuned["loss"] < base["loss"] and tuned["mean_token_accuracy"] >= base["mean_token_accuracy"]
    assert tuned["tokens"] == base["tokens"] and tuned["exact_match_examples"] == 16


# ------------------------------------------------------------------ refusals


def insert_file(stack: Stack, *, purpose: str, status: str) -> str:
    """A file row the upload route cannot make (it accepts only processed fine-tune files)."""
    from app.db.models import File

    file_id = f"file-{purpose.replace('-', '')}{status}"
    engine = sa.create_engine(stack.env["ADAPTERY_DATABASE_URL"])
    with Session(engine) as session:
        if session.get(File, file_id) is None:
            session.add(File(id=file_id, tenant_id="default", filename="x.jsonl", purpose=purpose, bytes=1,
                             status=status, deleted=False))
            session.commit()
    engine.dispose()
    return file_id


REFUSALS = [
    # (case, body or a function of the module's names, status, param, code)
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
]


@pytest.mark.parametrize(("case", "body", "status", "param", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_field(client: httpx.Client, stack: Stack, files: dict[str, str], trained: dict[str, Any],
                                 case: str, body: Any, status: int, param: str, code: str) -> None:
    names = {**files, **trained, "assistants": insert_file(stack, purpose="assistants", status="processed"),
             "error": insert_file(stack, purpose="fine-tune", status="error")}
    before = [e["id"] for e in client.get("/v1/evaluations", params={"limit": 100}).json()["data"]]
    response = evaluate(client, body(names))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    if param.startswith("models["):
        assert "models" in error["message"] or "model" in error["message"]
    after = [e["id"] for e in client.get("/v1/evaluations", params={"limit": 100}).json()["data"]]
    assert after == before  # nothing stored


def test_unknown_ids_and_cursors_are_404(client: httpx.Client) -> None:
    for path, params in (("/v1/evaluations/eval-nope", {}), ("/v1/evaluations", {"after": "eval-nope"})):
        response = client.get(path, params=params)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", path


# ------------------------------------------------------------------ tenants, pages, idempotency


def test_another_tenant_sees_and_uses_nothing(client: httpx.Client, stack: Stack, tenant_b: httpx.Client,
                                              files: dict[str, str], trained: dict[str, Any]) -> None:
    own = client.get("/v1/evaluations", params={"limit": 100}).json()["data"]
    assert own, "the tests above created evaluations"
    for evaluation in own:
        missing = tenant_b.get(f"/v1/evaluations/{evaluation['id']}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert tenant_b.get("/v1/evaluations", params={"after": evaluation["id"]}).status_code == 404
    assert tenant_b.get("/v1/evaluations").json()["data"] == []
    # Naming A's file or A's model answers exactly as naming ones that do not exist.
    b_file = upload(tenant_b, VALID).json()["id"]
    pairs = [({"file": files["valid"], "models": [TINY_MODEL_ID]}, {"file": "file-missing", "models": [TINY_MODEL_ID]}),
             ({"file": b_file, "models": [trained["weights"]]}, {"file": b_file, "models": ["ft:does-not-exist"]})]
    for as_a, as_missing in pairs:
        got, expected = evaluate(tenant_b, as_a), evaluate(tenant_b, as_missing)
        assert got.status_code == expected.status_code and got.status_code in (400, 404)
        assert got.json()["error"]["param"] == expected.json()["error"]["param"]
    # A public adapter may be evaluated by everyone.
    adapter_id = next(a["id"] for a in client.get("/v1/adapters").json()["data"] if a["name"] == trained["weights"])
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": True}).raise_for_status()
        try:
            accepted = evaluate(tenant_b, {"file": b_file, "models": [TINY_MODEL_ID, trained["weights"]]})
        finally:
            admin.post(f"/v1/admin/adapters/{adapter_id}/visibility", json={"public": False}).raise_for_status()
    assert accepted.status_code == 200, accepted.text
    assert [e["id"] for e in tenant_b.get("/v1/evaluations").json()["data"]] == [accepted.json()["id"]]
    assert accepted.json()["id"] not in {e["id"] for e in client.get("/v1/evaluations", params={"limit": 100})
                                         .json()["data"]}


def test_pages_newest_first_and_idempotency(client: httpx.Client, files: dict[str, str]) -> None:
    body = {"file": files["valid"], "models": [TINY_MODEL_ID]}
    created = [evaluate(client, body).json()["id"] for _ in range(3)]
    key = {"Idempotency-Key": "evaluation-key-1"}
    first, again = evaluate(client, body, headers=key), evaluate(client, body, headers=key)
    assert first.status_code == again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    other = evaluate(client, {**body, "metadata": {"x": "y"}}, headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    created.append(first.json()["id"])

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
    assert pages == [e["id"] for e in everything]
    for evaluation_id in created:
        assert wait_for_evaluation(client, evaluation_id)["status"] == "succeeded"


# ------------------------------------------------------------------ recovery


def test_the_reaper_recovers_unsent_and_orphaned_evaluations(client: httpx.Client, stack: Stack,
                                                              files: dict[str, str]) -> None:
    """One evaluation accepted while the broker was unreachable (never sent), one left running by a worker that
    died: the reaper hands both to the worker, and both succeed."""
    from app.db.models import Evaluation, EvaluationStatus

    engine = sa.create_engine(stack.env["ADAPTERY_DATABASE_URL"])
    ids = {"unsent": f"eval-unsent{time.time_ns()}", "orphaned": f"eval-orphan{time.time_ns()}"}
    target = [{"model": TINY_MODEL_ID, "adapter_id": None}]
    with Session(engine) as session:
        for case, evaluation_id in ids.items():
            session.add(Evaluation(
                id=evaluation_id, tenant_id="default", seq=time.time_ns(), file=files["valid"],
                base_model=TINY_MODEL_ID, models=[TINY_MODEL_ID], targets=target,
                status=EvaluationStatus.queued if case == "unsent" else EvaluationStatus.running,
                attempts=0 if case == "unsent" else 1, lease_owner=None if case == "unsent" else "gone:1:x",
                lease_expires_at=None if case == "unsent" else time.time() - 5, created_at=int(time.time())))
        session.commit()
    engine.dispose()
    for evaluation_id in ids.values():
        done = wait_for_evaluation(client, evaluation_id)
        assert done["status"] == "succeeded", done
        assert done["results"][0]["model"] == TINY_MODEL_ID
