"""On-demand evaluations end to end: real HTTP, a real Celery worker on Redis, PostgreSQL, the tiny model.

One stack and two fine-tuned models (a weight method and a prompt-learning one) are shared by the module.
The worker's numbers are checked against the same metric functions run here, in this process, on a freshly
loaded base model per adapter, so applying and removing adapters one after another in the worker changes
nothing; recovery goes through the reaper. Refusals, pages, idempotency and tenants are checked in this process:
tests/api/test_evaluations.py.
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
from tests.conftest import Stack, chat_lines, running_stack, upload, wait_for_status
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
            "method": {"type": method, method: {"hyperparameters": hyperparameters}}, "graders": JOB_GRADERS})
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


# The jobs' end reports grade with these: a string check the end report's exact match must agree with, and a
# rubric the job's base model scores (with the adapter disabled).
JOB_GRADERS = [
    {"type": "string_check", "name": "exact", "operation": "eq", "input": "{{sample.output_text}}",
     "reference": "{{item.reference_answer}}"},
    {"type": "score_model", "name": "judge", "model": TINY_MODEL_ID, "range": [0, 9],
     "sampling_params": {"max_completions_tokens": 3},
     "input": [{"role": "user", "content": "0-9? {{sample.output_text}}"}]}]


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
        assert result["grades"] is None  # no graders were asked for
        metrics = {k: v for k, v in result.items() if k not in ("model", "grades")}
        assert metrics == pytest.approx(reference, abs=2e-6), result["model"]

    # Where the jobs report their own end-of-training metrics on this validation file, computed on the model in
    # training memory (for P-tuning: the prompt encoder itself, not its saved output), they agree too (their
    # batches differ in size, so up to rounding in the compute dtype: one token of 42 for the accuracy).
    for method, index in ((DEFAULT_METHOD, 1), (PROMPT_METHOD, 2)):
        report = trained["jobs"][method]["result"]
        assert [g["name"] for g in trained["jobs"][method]["graders"]] == ["exact", "judge"]
        for mine, theirs in ((results[index], report), (results[0], report["base_model"])):
            exact, judge = theirs["grades"]
            assert (exact["name"], exact["examples"], judge["name"], judge["examples"]) == ("exact", 6, "judge", 6)
            assert exact["score"] == pytest.approx(theirs["full_valid_exact_match"]), method
            assert 0 <= judge["score"] <= 9, judge
            assert theirs["full_valid_loss"] == pytest.approx(mine["loss"], rel=1e-3), method
            assert theirs["full_valid_mean_token_accuracy"] == pytest.approx(mine["mean_token_accuracy"], abs=0.03)


def test_the_adapter_beats_the_base_model_on_its_training_file(client: httpx.Client, files: dict[str, str],
                                                                trained: dict[str, Any]) -> None:
    """…and its graders grade the same greedy answers exact match read: a string check of equality scores what
    exact match does, `ne` the rest; a scoring model (the fine-tuned model itself) answers every sample."""
    models = [trained["weights"], TINY_MODEL_ID]  # results follow the order given, not base first
    answer = {"input": "{{sample.output_text}}", "reference": "{{item.reference_answer}}"}
    graders = [
        {"type": "string_check", "name": "eq", "operation": "eq", **answer},
        {"type": "string_check", "name": "ne", "operation": "ne", **answer},
        {"type": "text_similarity", "name": "rouge", "evaluation_metric": "rouge_l", "pass_threshold": 0.5,
         **answer},
        {"type": "score_model", "name": "judge", "model": trained["weights"], "range": [0, 9],
         "sampling_params": {"max_completions_tokens": 4},
         "input": [{"role": "user", "content": "Rate 0-9: {{item.messages[0].content}} {{sample.output_text}}"}]},
        {"type": "multi", "name": "overall", "graders": {
            "bleu": {"type": "text_similarity", "name": "bleu", "evaluation_metric": "bleu", **answer},
            "exact": {"type": "string_check", "name": "exact", "operation": "eq", **answer}},
         "calculate_output": "0.5 * bleu + 0.5 * exact"}]
    created = evaluate(client, {"file": files["train"], "models": models, "graders": graders}).json()
    done = wait_for_evaluation(client, created["id"])
    assert done["status"] == "succeeded", done
    tuned, base = done["results"]
    assert (tuned["model"], base["model"]) == tuple(models)
    assert tuned["loss"] < base["loss"] and tuned["mean_token_accuracy"] >= base["mean_token_accuracy"]
    assert tuned["tokens"] == base["tokens"] and tuned["exact_match_examples"] == 16
    assert [g["name"] for g in done["graders"]] == ["eq", "ne", "rouge", "judge", "overall"]
    for result in (tuned, base):
        grades = {g["name"]: g for g in result["grades"]}
        assert all(g["examples"] == 16 for g in grades.values()), grades
        assert grades["eq"]["score"] == pytest.approx(result["exact_match"]) == grades["eq"]["pass_rate"]
        assert grades["ne"]["score"] == pytest.approx(1 - result["exact_match"])
        assert grades["rouge"]["score"] >= grades["eq"]["score"] - 1e-9  # an exact answer has ROUGE-L 1
        assert 0 <= grades["judge"]["score"] <= 9 and grades["judge"]["pass_rate"] is None
        assert grades["judge"]["errors"] == 0 or "no number" in grades["judge"]["first_error"]
        overall = grades["overall"]
        assert overall["parts"]["exact"] == pytest.approx(result["exact_match"], abs=1e-6)
        assert overall["score"] == pytest.approx(0.5 * overall["parts"]["bleu"] + 0.5 * overall["parts"]["exact"],
                                                 abs=1e-5)


# ------------------------------------------------------------------ recovery


@pytest.mark.sqlite_e2e
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
