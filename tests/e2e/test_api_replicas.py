"""Two API replicas (separate processes) on one database, as behind a load balancer: requests that share an
Idempotency-Key, sent to both replicas at once, create one job and all get its answer; a file uploaded through
one replica is usable through the other."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.budgets import budget
from tests.conftest import AUTH, Stack, chat_lines, make_stack, upload
from tests.services import free_port
from tests.tiny_model import TINY_MODEL_ID

# Run again on SQLite (make test-sqlite): two processes racing on one Idempotency-Key, on each database.
pytestmark = pytest.mark.sqlite_e2e


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
             database_url: str) -> Iterator[tuple[Stack, str]]:
    stack = make_stack(tmp_path_factory.mktemp("api-replicas"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir)
    stack.start_api()
    port = free_port()
    stack._spawn("api-2", [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port",
                           str(port), "--log-level", "warning"], env={"ADAPTERY_PORT": str(port)})
    try:
        stack.wait_ready_http()
        second = Stack(base_url=f"http://127.0.0.1:{port}", env=stack.env, data_dir=stack.data_dir, logs=stack.logs)
        second.processes = {"api": stack.processes["api-2"]}
        second.wait_ready_http()
        yield stack, second.base_url
    finally:
        stack.stop_all()


def test_one_idempotency_key_across_two_replicas_creates_one_job(replicas: tuple[Stack, str]) -> None:
    stack, second = replicas
    with stack.client() as client:
        training_file = upload(client, chat_lines(4)).json()["id"]
    body = {"model": TINY_MODEL_ID, "training_file": training_file}

    def send(i: int) -> httpx.Response:
        base = stack.base_url if i % 2 else second  # alternate between the replicas
        with httpx.Client(base_url=base, timeout=budget(60), headers=AUTH) as own:
            return own.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "two-replicas-key"})

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(send, range(8)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    with httpx.Client(base_url=second, timeout=budget(30), headers=AUTH) as client:
        jobs = [j for j in client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
                if j["training_file"] == training_file]
        assert [j["id"] for j in jobs] == [answers[0].json()["id"]]
        assert client.post(f"/v1/fine_tuning/jobs/{jobs[0]['id']}/cancel").status_code == 200
