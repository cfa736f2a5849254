"""The whole service on an S3-compatible object store (moto's standalone server, its own process) with no
shared disk: the API and each worker have data dirs of their own, as separate hosts would. A dataset uploaded
to the API trains on a worker; that worker is killed mid-job and a second one, on an empty data dir, resumes
from the checkpoint the first left in the object store; the API then serves the adapter the second
published, and its files and curves are the same from every host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    S3_CREDENTIALS,
    Stack,
    all_events,
    chat_lines,
    new_bucket,
    running_api,
    upload,
    wait_for_status,
)
from tests.e2e.test_reliability import SLOW_STEPS, create, fast_recovery, resumed_from, wait_step

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str, database_url: str,
          s3_endpoint: str) -> Iterator[Stack]:
    with running_api(tmp_path_factory.mktemp("object-store"), database_url=database_url, broker_url=redis_url,
                     tiny_model_dir=tiny_model_dir,
                     extra={**fast_recovery(), **S3_CREDENTIALS, "ADAPTERY_S3_ENDPOINT_URL": s3_endpoint,
                            "ADAPTERY_ARTIFACT_STORE_URL": f"s3://{new_bucket(s3_endpoint)}/adaptery"}) as running:
        yield running


def host(stack: Stack, name: str) -> dict[str, str]:
    """A worker's environment with a data dir of its own: nothing on disk is shared with the API."""
    return {"ADAPTERY_DATA_DIR": str(stack.data_dir.parent / name)}


def test_train_kill_resume_on_another_host_and_serve_from_the_object_store(stack: Stack) -> None:
    from adapters.store import ObjectStore

    remote = ObjectStore(stack.env["ADAPTERY_ARTIFACT_STORE_URL"], stack.env["ADAPTERY_S3_ENDPOINT_URL"])
    with stack.client() as client:
        file_id = upload(client, chat_lines(40)).json()["id"]  # 20 steps, a checkpoint every 5
        assert remote.exists(f"files/{file_id}.jsonl")

        stack.start_worker("first-host", env={**host(stack, "first-host"), **SLOW_STEPS})
        job = create(client, file_id)
        assert wait_step(client, job["id"], 12)["status"] == "running"
        stack.kill("first-host")
        in_store = sorted({n.split("/")[0] for n in remote.names(f"checkpoints/{job['id']}")
                           if n.endswith("/COMPLETE")})
        assert in_store and in_store[-1] >= "step-00000010", in_store

        second = Path(host(stack, "second-host")["ADAPTERY_DATA_DIR"])
        stack.start_worker("second-host", env=host(stack, "second-host"))
        done = wait_for_status(client, job["id"], TERMINAL, timeout=120)
        assert done["status"] == "succeeded", f"{done}\n{stack.log_tail('second-host')}"
        # It resumed from the newest checkpoint the first host had published, fetched into its own data dir.
        assert resumed_from(client, job["id"]) == [int(in_store[-1].split("-")[1])]
        assert (second / "checkpoints" / job["id"] / in_store[-1] / "COMPLETE").is_file()
        assert any(e["message"].startswith("Fine-tuning job started again") for e in all_events(client, job["id"]))

        # The API's host has none of it on disk until it serves the adapter, fetched from the object store.
        adapter = next(a for a in client.get("/v1/adapters").json()["data"] if a["name"] == done["fine_tuned_model"])
        api_copy = stack.data_dir / "adapters" / adapter["id"]
        assert not api_copy.exists()
        answer = client.post("/v1/chat/completions", json={"model": done["fine_tuned_model"], "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "Say hi 1"}]})
        assert answer.status_code == 200, answer.text
        served = load_file(str(api_copy / "adapter_model.safetensors"))
        trained = load_file(str(second / "adapters" / adapter["id"] / "adapter_model.safetensors"))
        assert served.keys() == trained.keys() and all(torch.equal(served[k], trained[k]) for k in served)

        # Curves and downloads read the shared truth, not one host's disk.
        curves = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
        assert [p["step"] for p in curves] == list(range(1, 21))
        archive = client.get(f"/v1/adapters/{adapter['id']}/content")
        assert archive.status_code == 200 and archive.content[:2] == b"PK"
        assert client.get(f"/v1/files/{file_id}/content").text == chat_lines(40)


def test_an_adapter_missing_from_the_object_store_is_a_clear_error(stack: Stack) -> None:
    from adapters.store import ObjectStore

    remote = ObjectStore(stack.env["ADAPTERY_ARTIFACT_STORE_URL"], stack.env["ADAPTERY_S3_ENDPOINT_URL"])
    with stack.client() as client:
        models = [a for a in client.get("/v1/adapters").json()["data"] if not a["name"].count(":ckpt-")]
        assert models
        broken = models[0]
        remote.delete_one(f"adapters/{broken['id']}/COMPLETE")  # as if its publish had never finished
        local = stack.data_dir / "adapters" / broken["id"]
        for item in local.glob("*"):
            item.unlink()
        answer = client.post("/v1/chat/completions", json={"model": broken["name"], "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "adapter_unavailable"
        assert "not completely published" in answer.json()["error"]["message"]
        assert client.get("/health").status_code == 200
