"""The compose topology as plain processes (no Docker engine runs here): PostgreSQL, Redis, an S3-compatible
object store (moto's server), one API (role api), two inference replicas (role inference) and two training
workers, each process with a data dir of its own, so everything they share goes through the database, the
broker and the object store. End to end through the API: upload, train two jobs, chat with both fine-tuned
models (one streamed), and every answer comes from an inference replica that fetched the adapter itself."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.budgets import budget
from tests.conftest import S3_CREDENTIALS, Stack, chat_lines, make_stack, new_bucket, upload, wait_for_status
from tests.e2e.test_roles import INTERNAL, uvicorn, wait_replicas_up
from tests.services import free_port
from tests.tiny_model import TINY_MODEL_ID


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str, database_url: str,
             s3_endpoint: str) -> Iterator[Stack]:
    stack = make_stack(tmp_path_factory.mktemp("topology"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra={
                           **INTERNAL, **S3_CREDENTIALS, "ADAPTERY_S3_ENDPOINT_URL": s3_endpoint,
                           "ADAPTERY_ARTIFACT_STORE_URL": f"s3://{new_bucket(s3_endpoint)}/artifacts"})

    def own_dir(name: str) -> dict[str, str]:
        return {"ADAPTERY_DATA_DIR": str(stack.data_dir.parent / name)}

    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        stack._spawn(f"inference-{i}", uvicorn(port), env={**own_dir(f"inference-{i}"), "ADAPTERY_ROLE": "inference",
                                                            "ADAPTERY_PORT": str(port)})
    stack._spawn("api", uvicorn(int(stack.base_url.rsplit(":", 1)[1])), env={
        "ADAPTERY_ROLE": "api", "ADAPTERY_ROUTING_POLL_SECONDS": "0.3",
        "ADAPTERY_INFERENCE_URLS": ",".join(f"http://127.0.0.1:{p}" for p in ports)})
    for name in ("worker-1", "worker-2"):
        stack.start_worker(name, env=own_dir(name))
    try:
        stack.wait_ready()
        wait_replicas_up(stack, 2)
        stack.wait_workers_ready("worker-1", "worker-2")
        yield stack
    finally:
        stack.stop_all()


def test_upload_train_and_chat_through_the_api_across_every_tier(topology: Stack) -> None:
    with topology.client() as client:
        file_id = upload(client, chat_lines(12)).json()["id"]
        jobs = []
        for _ in range(2):
            job = client.post("/v1/fine_tuning/jobs", json={
                "model": TINY_MODEL_ID, "training_file": file_id,
                "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 2, "learning_rate": 0.01}}}})
            assert job.status_code == 200, job.text
            jobs.append(job.json()["id"])
        models = []
        for job_id in jobs:
            done = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"})
            assert done["status"] == "succeeded", done
            models.append(done["fine_tuned_model"])
        # The workers' data dirs are their own: the API's host never saw the training files or the adapters.
        assert not (topology.data_dir / "adapters").exists()

        replicas = set()
        for model in models:
            answer = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 8, "temperature": 0,
                                                               "messages": [{"role": "user", "content": "Say hi 1"}]})
            assert answer.status_code == 200, answer.text
            replicas.add(answer.headers["x-adaptery-replica"])
            with client.stream("POST", "/v1/chat/completions", json={
                    "model": model, "max_tokens": 8, "temperature": 0, "stream": True,
                    "messages": [{"role": "user", "content": "Say hi 1"}]}) as stream:
                pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                          for line in stream.iter_lines() if line.startswith("data: {")]
            assert "".join(pieces) == answer.json()["choices"][0]["message"]["content"]
        for i in sorted(replicas):  # each replica that answered fetched its adapter from the object store
            fetched = list((topology.data_dir.parent / f"inference-{i}" / "adapters").glob("adapter-*"))
            assert fetched, f"inference-{i} served without a local copy?"
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert set(models) <= listed

        # The API shows what the replicas hold as one process would: each adapter's residency in full (the
        # console's columns) and the engine's gauges in /metrics, from the replicas' last reported state.
        deadline = time.monotonic() + budget(30)
        while True:
            shown = {a["name"]: a for a in client.get("/v1/adapters", params={"limit": 100}).json()["data"]}
            gauge = f'adaptery_adapters{{base_model="{TINY_MODEL_ID}",state="active"}} '
            active = [float(line.removeprefix(gauge)) for line in client.get("/metrics").text.splitlines()
                      if line.startswith(gauge)]
            served = [shown[m] for m in models]
            if all(a["state"] == "active" and a["last_used_at"] and a["rank"] and a["load_ms"] is not None
                   for a in served) and active and active[0] >= 2:
                break
            assert time.monotonic() < deadline, (served, active)
            time.sleep(0.3)
