"""Separate tiers from one codebase: an API process (ADAPTERY_ROLE=api) that never imports torch and forwards
inference to two inference replicas (ADAPTERY_ROLE=inference), all real processes over HTTP on PostgreSQL.

Requests for an adapter stick to the replica that holds it; one hot adapter spreads to the second replica
once the first is loaded (bounded load); streams pass through; a replica killed with -9 costs nothing
to the requests that come after it; the residency API reads and acts on the replicas."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.budgets import budget
from tests.conftest import ROOT, Stack, make_stack
from tests.services import free_port
from tests.tiny_model import TINY_MODEL_ID

INTERNAL = {"ADAPTERY_INTERNAL_KEY": "internal-test-key"}
N_ADAPTERS = 3


def uvicorn(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
          database_url: str) -> Iterator[tuple[Stack, list[int]]]:
    stack = make_stack(tmp_path_factory.mktemp("tiers"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra=INTERNAL)
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        stack._spawn(f"replica-{i}", uvicorn(port), env={"ADAPTERY_ROLE": "inference", "ADAPTERY_PORT": str(port),
                                                          "ADAPTERY_PRELOAD_INFERENCE": "true"})
    stack._spawn("api", uvicorn(int(stack.base_url.rsplit(":", 1)[1])), env={
        "ADAPTERY_ROLE": "api", "ADAPTERY_INFERENCE_URLS": ",".join(f"http://127.0.0.1:{p}" for p in ports),
        "ADAPTERY_ROUTING_POLL_SECONDS": "0.3"})
    try:
        stack.wait_ready_http()
        wait_replicas_up(stack, 2)
        yield stack, ports
    finally:
        stack.stop_all()


def wait_replicas_up(stack: Stack, count: int) -> None:
    deadline = time.monotonic() + budget(90)
    while time.monotonic() < deadline:
        checks = httpx.get(f"{stack.base_url}/ready", timeout=5).json()["checks"]
        if checks["inference"]["up"] == count:
            return
        time.sleep(0.3)
    raise TimeoutError(f"inference replicas not up: {checks['inference']}\n{stack.log_tail('replica-0')}")


@pytest.fixture(scope="module")
def adapters(tiers: tuple[Stack, list[int]], tmp_path_factory: pytest.TempPathFactory,
             tiny_model_dir: Path) -> list[dict[str, Any]]:
    """Random LoRA adapters made with PEFT, imported through the API (a replica checks each one)."""
    from transformers import AutoModelForCausalLM

    from bench.serving import create_adapters

    stack, _ = tiers
    folders, _ = create_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                 tmp_path_factory.mktemp("loras"), N_ADAPTERS, seed=3)
    imported = []
    with stack.client() as client:
        for i, folder in enumerate(folders):
            parts = [("files", (name, (folder / name).read_bytes()))
                     for name in ("adapter_config.json", "adapter_model.safetensors")]
            answer = client.post("/v1/adapters", data={"name": f"tier-lora-{i}"}, files=parts)
            assert answer.status_code == 200, answer.text
            imported.append(answer.json())
    return imported


def chat(client: httpx.Client, model: str, max_tokens: int = 6) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Say hi"}]})


def replica_state(port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{port}/internal/state", timeout=5,
                     headers={"Authorization": f"Bearer {INTERNAL['ADAPTERY_INTERNAL_KEY']}"}).json()


def libraries_mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_requests_stick_to_the_replica_holding_their_adapter(tiers: tuple[Stack, list[int]],
                                                             adapters: list[dict[str, Any]]) -> None:
    stack, ports = tiers
    with stack.client() as client:
        for adapter in adapters:
            served_by = set()
            for _ in range(4):
                answer = chat(client, adapter["name"])
                assert answer.status_code == 200, answer.text
                served_by.add(answer.headers["x-adaptery-replica"])
            assert len(served_by) == 1, (adapter["name"], served_by)  # affinity: always the same replica
            holder = int(served_by.pop())
            assert adapter["id"] in replica_state(ports[holder])["held"]
        # Base-model requests go wherever there is room; the answer is the engine's either way.
        assert chat(client, TINY_MODEL_ID).status_code == 200
        # The residency API reads the replicas: the adapter is active where it was served.
        time.sleep(budget(1))
        assert client.get(f"/v1/adapters/{adapters[0]['id']}").json()["state"] == "active"
        pinned = client.post(f"/v1/adapters/{adapters[0]['id']}/pin")
        assert pinned.status_code == 200 and pinned.json()["pinned"] is True, pinned.text
        assert client.post(f"/v1/adapters/{adapters[0]['id']}/unpin").status_code == 200


def test_streams_pass_through_as_they_are_generated(tiers: tuple[Stack, list[int]],
                                                   adapters: list[dict[str, Any]]) -> None:
    stack, _ = tiers
    with stack.client() as client:
        plain = chat(client, adapters[1]["name"], max_tokens=24).json()["choices"][0]["message"]["content"]
        pieces, arrivals = [], []
        started = time.monotonic()
        with client.stream("POST", "/v1/chat/completions", json={
                "model": adapters[1]["name"], "max_tokens": 24, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Say hi"}]}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    pieces.append(delta.get("content") or "")
                    arrivals.append(time.monotonic() - started)
        assert "".join(pieces) == plain
        assert len(arrivals) >= 10 and arrivals[0] < arrivals[-1]  # chunk by chunk, not one buffered body


def test_a_hot_adapter_spreads_to_a_second_replica_under_load(tiers: tuple[Stack, list[int]],
                                                              adapters: list[dict[str, Any]]) -> None:
    stack, _ = tiers
    with stack.client() as client, ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: chat(client, adapters[2]["name"], max_tokens=48), range(12)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    spread = Counter(a.headers["x-adaptery-replica"] for a in answers)
    assert len(spread) == 2, spread  # bounded load: the owner took its share, the rest went to the other


def test_the_api_process_never_loads_torch(tiers: tuple[Stack, list[int]], adapters: list[dict[str, Any]]) -> None:
    stack, _ = tiers
    with stack.client() as client:
        from tests.conftest import chat_lines, upload

        file_id = upload(client, chat_lines(4)).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": file_id})
        assert job.status_code == 200, job.text
        client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel")
        assert client.get("/v1/fine_tuning/methods").status_code == 200
        assert client.get("/").status_code == 200
    api_maps = libraries_mapped(stack.processes["api"].pid)
    assert "libtorch" not in api_maps, "the API process loaded torch"
    assert "libtorch" in libraries_mapped(stack.processes["replica-0"].pid)  # the check can see it


def test_a_killed_replica_costs_only_its_in_flight_requests(tiers: tuple[Stack, list[int]],
                                                            adapters: list[dict[str, Any]]) -> None:
    stack, ports = tiers
    with stack.client() as client:
        holder = int(chat(client, adapters[0]["name"]).headers["x-adaptery-replica"])
        stack.kill(f"replica-{holder}")
        # Immediately, before any health poll has noticed: the request is retried on the other replica.
        for adapter in adapters:
            answer = chat(client, adapter["name"])
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-adaptery-replica"] == str(1 - holder)
        wait_replicas_up(stack, 1)
        assert httpx.get(f"{stack.base_url}/ready", timeout=5).json()["checks"]["inference"]["up"] == 1


def test_a_split_role_without_its_settings_refuses_to_start(tiers: tuple[Stack, list[int]]) -> None:
    stack, _ = tiers
    env = {**stack.env, "ADAPTERY_ROLE": "api", "ADAPTERY_INFERENCE_URLS": "", "ADAPTERY_PORT": str(free_port())}
    done = subprocess.run(uvicorn(int(env["ADAPTERY_PORT"])), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=budget(60))
    assert done.returncode != 0 and "ADAPTERY_INFERENCE_URLS" in done.stderr
