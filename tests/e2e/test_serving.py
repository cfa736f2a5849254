"""Serving over real HTTP: streaming (SSE), concurrent mixed-adapter requests, the adapter residency API,
and the unchanged OpenAI SDK driving the whole flow."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.budgets import budget
from tests.conftest import AUTH, TEST_KEY, Stack, chat_lines, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID


@pytest.fixture(scope="module")
def client(stack: Stack) -> httpx.Client:
    with stack.client() as c:
        yield c


@pytest.fixture(scope="module")
def adapters(client: httpx.Client) -> list[str]:
    """Two small LoRA adapters trained through the API, taught different answers."""
    names = []
    for seed, answer in ((1, "HELLO WORLD"), (2, "GOODBYE MOON")):
        file_id = upload(client, chat_lines(16, answer=answer)).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": TINY_MODEL_ID, "training_file": file_id, "seed": seed, "suffix": f"serve{seed}",
            "method": {"type": "lora", "lora": {"hyperparameters": {"learning_rate": 0.02, "n_epochs": 2}}}}).json()
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"})
        assert done["status"] == "succeeded", done
        names.append(done["fine_tuned_model"])
    return names


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data:"):].strip() for line in response.iter_lines() if line.startswith("data:")]


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi 7"}], "max_tokens": 12,
            "temperature": 0, **extra}


def test_chat_stream_matches_the_plain_response(client: httpx.Client, adapters: list[str]) -> None:
    plain = client.post("/v1/chat/completions", json=chat_body(adapters[0])).json()
    with client.stream("POST", "/v1/chat/completions",
                       json=chat_body(adapters[0], stream=True, stream_options={"include_usage": True})) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == adapters[0] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_completion_stream(client: httpx.Client) -> None:
    body = {"model": TINY_MODEL_ID, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_client_leaving_a_stream_does_not_hurt_the_server(client: httpx.Client) -> None:
    with client.stream("POST", "/v1/chat/completions", json=chat_body(TINY_MODEL_ID, stream=True,
                                                                         max_tokens=2000)) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data:") and "content" in line:
                break
    # The server freed that sequence: a new request is served at once and completely.
    reply = client.post("/v1/chat/completions", json=chat_body(TINY_MODEL_ID), timeout=budget(30))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 12


def test_concurrent_requests_on_different_adapters(client: httpx.Client, adapters: list[str]) -> None:
    models = [TINY_MODEL_ID, adapters[0], adapters[1]] * 3
    alone = {m: client.post("/v1/chat/completions", json=chat_body(m)).json()["choices"][0]["message"]["content"]
             for m in set(models)}
    assert len(set(alone.values())) == 3  # the two adapters and the base model really differ

    def ask(model: str) -> str:
        with httpx.Client(base_url=str(client.base_url), timeout=budget(120), headers=AUTH) as own:
            response = own.post("/v1/chat/completions", json=chat_body(model))
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        answers = list(pool.map(ask, models))
    assert answers == [alone[m] for m in models]


def test_adapter_residency_api(client: httpx.Client, adapters: list[str]) -> None:
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert set(adapters) <= set(listed)
    adapter = listed[adapters[1]]
    assert adapter["object"] == "adapter" and adapter["base_model"] == TINY_MODEL_ID and adapter["method"] == "lora"
    assert adapter["size_bytes"] > 0

    unloaded = client.post(f"/v1/adapters/{adapter['id']}/unload").json()
    assert unloaded["state"] == "on_disk"
    loaded = client.post(f"/v1/adapters/{adapter['id']}/load").json()
    assert loaded["state"] == "active" and loaded["rank"] == 8 and loaded["load_ms"] is not None
    pinned = client.post(f"/v1/adapters/{adapters[1]}/pin").json()  # by model name works too
    assert pinned["pinned"] is True and pinned["state"] == "active"
    refused = client.post(f"/v1/adapters/{adapter['id']}/unload")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_pinned"
    assert client.post(f"/v1/adapters/{adapter['id']}/unpin").json()["pinned"] is False
    assert client.post(f"/v1/adapters/{adapter['id']}/unload").json()["state"] == "on_disk"
    # Used again, it is loaded again: hot-swapped back without anyone asking.
    client.post("/v1/chat/completions", json=chat_body(adapters[1]))
    again = client.get(f"/v1/adapters/{adapter['id']}").json()
    assert again["state"] == "active" and again["last_used_at"] is not None

    assert client.get("/v1/adapters/adapter-missing").status_code == 404
    assert client.post("/v1/adapters/adapter-missing/pin").status_code == 404


def test_the_openai_sdk_works_unchanged(stack: Stack) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=TEST_KEY, max_retries=0)
    file = sdk.files.create(file=("train.jsonl", chat_lines(8).encode()), purpose="fine-tune")
    assert file.status == "processed"
    job = sdk.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=file.id, hyperparameters={"n_epochs": 1})
    assert job.status in ("queued", "running")
    with stack.client() as raw:
        wait_for_status(raw, job.id, {"succeeded"})
    job = sdk.fine_tuning.jobs.retrieve(job.id)
    assert job.fine_tuned_model and job.status == "succeeded"
    events = sdk.fine_tuning.jobs.list_events(job.id, limit=50)
    assert any(e.type == "metrics" for e in events.data)
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=100)].count(job.id) == 1
    reply = sdk.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=5, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
    streamed = sdk.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == reply.choices[0].message.content
    assert job.fine_tuned_model in [m.id for m in sdk.models.list().data]
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="ft:missing", messages=[{"role": "user", "content": "hi"}])
