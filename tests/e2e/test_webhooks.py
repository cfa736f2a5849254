"""Webhooks end to end: a receiver this test runs on 127.0.0.1 gets each job outcome from the real worker,
signed per Standard Webhooks (verified with the standardwebhooks library), and retried after it answers 500.
Endpoints that point at forbidden targets are refused in this process: tests/api/test_webhooks.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.budgets import budget
from tests.conftest import Stack, chat_lines, running_stack, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID


class Receiver:
    """An HTTP server that records every POST and answers `failures` 500s before it answers 200."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.failures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                receiver.received.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body, "at": time.monotonic()})
                failing = receiver.failures > 0
                receiver.failures -= 1 if failing else 0
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + budget(timeout)
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.received) >= count, self.received
        return self.received


@pytest.fixture(scope="module")
def hook_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
               database_url: str) -> Iterator[Stack]:
    extra = {"ADAPTERY_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]', "ADAPTERY_WEBHOOK_RETRY_SECONDS": "0.5",
             "ADAPTERY_WEBHOOK_POLL_SECONDS": "0.2"}
    with running_stack(tmp_path_factory.mktemp("webhooks"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra=extra) as running:
        yield running


@pytest.fixture()
def hook_client(hook_stack: Stack) -> Iterator[httpx.Client]:
    with hook_stack.client() as client:
        yield client


def new_endpoint(client: httpx.Client, url: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": url, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def run_job(client: httpx.Client, file_id: str | None = None, **hyperparameters: Any) -> dict[str, Any]:
    file_id = file_id or upload(client, chat_lines(4)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id,
        "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 2,
                                                                **hyperparameters}}}}).json()
    return wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"})


def test_each_outcome_arrives_signed_and_a_500_is_retried(hook_client: httpx.Client) -> None:
    receiver = Receiver()
    endpoint = new_endpoint(hook_client, receiver.url)
    assert endpoint["secret"].startswith("whsec_")
    listed = hook_client.get("/v1/webhooks").json()["data"]  # (the tenant may have others from other modules)
    assert endpoint["id"] in [e["id"] for e in listed]
    assert all(e["secret"] is None for e in listed)  # shown once only

    receiver.failures = 2
    job = run_job(hook_client)
    assert job["status"] == "succeeded", job
    attempts = receiver.wait_for(3)
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1, "a retry resends the same event"
    assert attempts[1]["at"] - attempts[0]["at"] >= 0.4  # backed off
    for attempt in attempts:
        payload = Webhook(endpoint["secret"]).verify(attempt["body"], attempt["headers"])
        assert payload == json.loads(attempt["body"])
    payload = json.loads(attempts[-1]["body"])
    assert payload["type"] == "fine_tuning.job.succeeded" and payload["data"] == {"id": job["id"]}
    assert payload["id"] == attempts[-1]["headers"]["webhook-id"] and payload["object"] == "event"
    deliveries = hook_client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
    assert [(d["status"], d["attempts"], d["last_status_code"]) for d in deliveries] == [("delivered", 3, 200)]
    # A signature made with another secret does not verify.
    with pytest.raises(Exception):  # noqa: B017 (the library raises its own WebhookVerificationError)
        Webhook("whsec_" + "A" * 32).verify(attempts[-1]["body"], attempts[-1]["headers"])

    # Every answer lies beyond max_seq_length=16 tokens: nothing to train on, so the job fails.
    long_prompts = "\n".join(json.dumps({"messages": [{"role": "user", "content": "word " * 60},
                                                       {"role": "assistant", "content": "yes"}]})
                              for _ in range(4)) + "\n"
    failed = run_job(hook_client, upload(hook_client, long_prompts).json()["id"], max_seq_length=16)
    assert failed["status"] == "failed"
    later = receiver.wait_for(4)
    assert json.loads(later[3]["body"])["type"] == "fine_tuning.job.failed"
    assert json.loads(later[3]["body"])["data"] == {"id": failed["id"]}
    assert hook_client.delete(f"/v1/webhooks/{endpoint['id']}").json()["deleted"] is True


def test_a_cancelled_job_and_an_endpoint_that_only_wants_failures(hook_client: httpx.Client) -> None:
    everything, failures_only = Receiver(), Receiver()
    all_events = new_endpoint(hook_client, everything.url)
    failures_only_endpoint = new_endpoint(hook_client, failures_only.url, events=["fine_tuning.job.failed"])
    file_id = upload(hook_client, chat_lines(8)).json()["id"]
    job = hook_client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id,
        "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}}).json()
    assert hook_client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert wait_for_status(hook_client, job["id"], {"cancelled"})["status"] == "cancelled"
    received = everything.wait_for(1)
    assert json.loads(received[0]["body"])["type"] == "fine_tuning.job.cancelled"
    Webhook(all_events["secret"]).verify(received[0]["body"], received[0]["headers"])
    time.sleep(1.5)
    assert failures_only.received == []
    for endpoint in (all_events, failures_only_endpoint):
        assert hook_client.delete(f"/v1/webhooks/{endpoint['id']}").status_code == 200
