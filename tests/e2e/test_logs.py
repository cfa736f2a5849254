"""Structured logs: with ADAPTERY_LOG_FORMAT=json the API and the worker write one JSON object per line, each
carrying the request id, tenant and job id it belongs to; the request id is the client's X-Request-ID."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import logs
from tests.budgets import budget
from tests.conftest import Stack, chat_lines, running_stack, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID


@pytest.fixture(scope="module")
def json_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
               database_url: str) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("json-logs"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra={"ADAPTERY_LOG_FORMAT": "json"}) as running:
        yield running


def records(stack: Stack, name: str) -> list[dict[str, Any]]:
    """The JSON log records of one process's log (other output, such as progress bars, is not a record)."""
    lines = [line for line in stack.log_tail(name, chars=10**7).splitlines() if line.startswith("{")]
    parsed = [json.loads(line) for line in lines]
    for record in parsed:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    return parsed


def test_api_and_worker_lines_carry_request_tenant_and_job(json_stack: Stack) -> None:
    with json_stack.client() as client:
        answer = client.get("/v1/models", headers={"X-Request-ID": "req-from-the-client-1"})
        assert answer.headers["X-Request-ID"] == "req-from-the-client-1"
        generated = client.get("/v1/models").headers["X-Request-ID"]
        assert generated.startswith("req-") and generated != "req-from-the-client-1"
        file_id = upload(client, chat_lines(4)).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": TINY_MODEL_ID, "training_file": file_id,
            "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}}}).json()
        assert wait_for_status(client, job["id"], {"succeeded", "failed"})["status"] == "succeeded"

    deadline = time.monotonic() + budget(10)
    while time.monotonic() < deadline:  # log lines are written after the response
        api = records(json_stack, "api")
        if any(r.get("request_id") == "req-from-the-client-1" for r in api):
            break
        time.sleep(0.2)
    line = next(r for r in api if r.get("request_id") == "req-from-the-client-1")
    assert line["route"] == "/v1/models" and line["status"] == 200 and line["tenant"] == "default"
    assert line["logger"] == "adaptery.http" and line["duration_ms"] >= 0

    worker = records(json_stack, "worker")
    of_the_job = [r for r in worker if r.get("job_id") == job["id"]]
    assert of_the_job, "the worker logged nothing with the job's id"
    assert all(r["tenant"] == "default" for r in of_the_job)


def test_text_format_shows_the_context_in_brackets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.use_format(handler, "text")
    logger = logging.getLogger("adaptery.test-text")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with logs.bound(job_id="ftjob-1", tenant="acme"):
            logger.warning("inside")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("inside [tenant=acme job_id=ftjob-1]")
    assert outside.endswith("outside")
