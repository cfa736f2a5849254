"""Serving over real HTTP: streaming (SSE), concurrent mixed-adapter requests, the adapter residency API,
and the unchanged OpenAI SDK driving the whole flow."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.budgets import budget
from tests.conftest import AUTH, TEST_KEY, Stack, chat_lines, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID


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


@pytest.fixture(scope="module")
def talkative_adapter(client: httpx.Client) -> str:
    """A LoRA trained with a vanishing learning rate: it answers as the random base model does, which runs on
    to max_tokens instead of ending its reply (the adapters above learned to stop after a few tokens)."""
    file_id = upload(client, chat_lines(4)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id, "suffix": "talkative",
        "method": {"type": "lora", "lora": {"hyperparameters": {"learning_rate": 1e-9, "n_epochs": 1}}}}).json()
    done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done
    return str(done["fine_tuned_model"])


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


def test_client_leaving_a_stream_frees_its_sequence(client: httpx.Client, talkative_adapter: str) -> None:
    """The server drops the sequence of a client that left, at once rather than when it would have ended.

    Observed through the adapter the sequence uses: unloading an adapter is refused (409 adapter_in_use)
    while a sequence of the running batch uses it, and succeeds once none does."""
    adapter_id = client.get(f"/v1/adapters/{talkative_adapter}").json()["id"]
    # How long the request runs when its client stays: a sequence left in the batch holds the adapter this long.
    started = time.monotonic()
    full = client.post("/v1/chat/completions", json=chat_body(talkative_adapter, max_tokens=2000))
    natural = time.monotonic() - started
    assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] == 2000, full.text

    with client.stream("POST", "/v1/chat/completions", json=chat_body(talkative_adapter, stream=True,
                                                                         max_tokens=2000)) as response:
        assert response.status_code == 200
        produced = 0
        # Held in a name: a line iterator dropped after `break` closes the connection, i.e. leaves right there.
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data:") and line != "data: [DONE]":
                choice = json.loads(line[len("data:"):])["choices"][0]
                assert choice["finish_reason"] is None, f"the sequence ended by itself: {choice}"
                produced += bool(choice["delta"].get("content"))
                if produced >= 2:  # decoding, in the running batch
                    break
        in_use = client.post(f"/v1/adapters/{adapter_id}/unload")
        assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "adapter_in_use", in_use.text
        left = time.monotonic()
    # The client has left (the connection closed mid-stream): its sequence must leave the batch.
    deadline = left + budget(15)
    while (unloaded := client.post(f"/v1/adapters/{adapter_id}/unload")).status_code == 409:
        assert unloaded.json()["error"]["code"] == "adapter_in_use", unloaded.text
        assert time.monotonic() < deadline, "the sequence of a client that left still holds its adapter"
        time.sleep(0.02)
    freed_after = time.monotonic() - left
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "on_disk", unloaded.text
    # Freed because the client left, not because it ran to max_tokens: that would have taken most of `natural`.
    assert freed_after < natural / 4, f"freed {freed_after:.2f} s after the client left; a full run takes " \
                                      f"{natural:.2f} s"
    # And the server goes on serving: the adapter is loaded again for the next request, which completes.
    reply = client.post("/v1/chat/completions", json=chat_body(talkative_adapter))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 12, reply.text
    assert client.get(f"/v1/adapters/{adapter_id}").json()["state"] == "active"


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


def test_the_openai_sdk_works_unchanged(stack: Stack, client: httpx.Client) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=TEST_KEY, max_retries=0)
    file = sdk.files.create(file=("train.jsonl", chat_lines(8).encode()), purpose="fine-tune")
    assert file.status == "processed"
    job = sdk.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=file.id, hyperparameters={"n_epochs": 1})
    assert job.status in ("queued", "running")
    wait_for_status(client, job.id, {"succeeded"})
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
