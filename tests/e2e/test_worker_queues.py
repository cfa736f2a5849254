"""Training workers by capability: each job waits in the queue of its base model and device class
(`train.<class or any>.<model>`), and only a worker that serves both takes it.

Two workers on one stack: `alpha` declares the cpu class and trains one base model, `beta` declares the gpu
class and trains another (the same tiny weights under a second name). `beta` runs on this CPU machine: a
worker's class is what its operator declares (ADAPTERY_WORKER_DEVICE_CLASS), which is what routing reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.budgets import budget
from tests.conftest import Stack, all_events, chat_lines, make_stack, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID

SECOND_MODEL = "tiny-llama-b"


@pytest.fixture(scope="module")
def two_model_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
                    database_url: str) -> Iterator[Stack]:
    stack = make_stack(tmp_path_factory.mktemp("queues"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra={"ADAPTERY_BASE_MODELS": json.dumps(
                           {TINY_MODEL_ID: str(tiny_model_dir), SECOND_MODEL: str(tiny_model_dir)})})
    stack.start_api()
    stack.start_worker("alpha", env={"ADAPTERY_WORKER_DEVICE_CLASS": "cpu",
                                     "ADAPTERY_WORKER_BASE_MODELS": TINY_MODEL_ID})
    stack.start_worker("beta", env={"ADAPTERY_WORKER_DEVICE_CLASS": "gpu",
                                    "ADAPTERY_WORKER_BASE_MODELS": SECOND_MODEL})
    try:
        stack.wait_ready()
        stack.wait_workers_ready("alpha", "beta")
        yield stack
    finally:
        stack.stop_all()


def started_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return [e for e in all_events(client, job_id) if e["message"].startswith("Fine-tuning job started")]


def test_each_job_runs_once_on_a_worker_of_its_model_and_class(two_model_stack: Stack) -> None:
    with two_model_stack.client() as client:
        file_id = upload(client, chat_lines(8)).json()["id"]
        cases = [(TINY_MODEL_ID, None, "alpha"), (SECOND_MODEL, None, "beta"),
                 (TINY_MODEL_ID, "cpu", "alpha"), (SECOND_MODEL, "gpu", "beta")]
        created = []
        for model, device_class, worker in cases:
            body: dict[str, Any] = {"model": model, "training_file": file_id,
                                    "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1}}}}
            if device_class:
                body["device_class"] = device_class
            job = client.post("/v1/fine_tuning/jobs", json=body)
            assert job.status_code == 200, job.text
            assert job.json()["queue"] == f"train.{device_class or 'any'}.{model}"
            assert job.json()["device_class"] == device_class
            created.append((job.json(), worker))
        # No worker trains the first model on a gpu: that job waits, queued, while the others finish.
        stranded = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id,
                                                             "device_class": "gpu"}).json()
        for job, worker in created:
            assert wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
            started = started_events(client, job["id"])
            assert len(started) == 1, started  # exactly once
            assert started[0]["data"]["worker"].startswith(f"{worker}-"), (job["queue"], started[0]["data"])
            assert started[0]["data"]["queue"] == job["queue"]
        time.sleep(budget(2))
        assert client.get(f"/v1/fine_tuning/jobs/{stranded['id']}").json()["status"] == "queued"
        assert not started_events(client, stranded["id"])
        assert client.post(f"/v1/fine_tuning/jobs/{stranded['id']}/cancel").status_code == 200

        refused = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id,
                                                            "device_class": "tpu"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "device_class"


def test_a_worker_naming_an_unknown_base_model_refuses_to_start(two_model_stack: Stack) -> None:
    process = two_model_stack.start_worker("confused", env={"ADAPTERY_WORKER_BASE_MODELS": "no-such-model"})
    assert process.wait(timeout=budget(60)) != 0
    assert "no-such-model" in two_model_stack.log_tail("confused") and "registered" in two_model_stack.log_tail(
        "confused")
