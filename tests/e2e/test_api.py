"""End to end through real HTTP, a real Celery worker on Redis, PostgreSQL, and a tiny real model: readiness, each
method trained and served, cancelling, and one Idempotency-Key raced across connections. Request validation, files,
paging, idempotency replay and inference errors are checked in this process: tests/api."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import torch

from adapters.methods import METHODS
from tests.budgets import budget
from tests.conftest import AUTH, Stack, all_events, chat_lines, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID


def method_hyperparameters(method: str) -> dict[str, Any]:
    """A learning rate high enough for the tiny random model to learn in 32 steps, from the method's default."""
    return {"learning_rate": min(0.1, 20 * METHODS[method].default_learning_rate), "n_epochs": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def training_file(client: httpx.Client) -> str:
    response = upload(client, chat_lines(32))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/fine_tuning/jobs", json=body)


def chat(client: httpx.Client, model: str, content: str = "Say hi 999", max_tokens: int = 8) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------ health


def test_health_and_ready(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"] and checks["worker"]["ok"]
    assert checks["warm_up"]["ok"] and checks["warm_up"]["seconds"] > 0


# ------------------------------------------------------------------ training end to end, per method


def adapter_folder(stack: Stack, name: str) -> Path:
    engine = sa.create_engine(stack.env["ADAPTERY_DATABASE_URL"])
    with engine.connect() as conn:
        adapter_id = conn.execute(sa.text("SELECT id FROM adapters WHERE name = :n"), {"n": name}).scalar_one()
    engine.dispose()
    return stack.data_dir / "adapters" / adapter_id


def peft_reference(tiny_model_dir: Path, folder: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(folder))
    model.eval()
    return model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_and_serve_each_method(client: httpx.Client, stack: Stack, tiny_model_dir: Path, tiny_tokenizer: Any,
                                     method: str) -> None:
    train = upload(client, chat_lines(32)).json()["id"]
    valid = upload(client, chat_lines(6, start=100)).json()["id"]
    response = create_job(client, {
        "model": TINY_MODEL_ID, "training_file": train, "validation_file": valid, "suffix": f"e2e-{method}",
        "seed": 7, "metadata": {"case": method},
        "method": {"type": method, method: {"hyperparameters": method_hyperparameters(method)}}})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] in ("queued", "running") and job["method"]["type"] == method
    assert job["method"][method]["hyperparameters"]["learning_rate"] == method_hyperparameters(method)["learning_rate"]

    job = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", f"{job}\n{stack.log_tail('worker')}"
    name = job["fine_tuned_model"]
    assert name.startswith(f"ft:{TINY_MODEL_ID}:e2e-{method}:")
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["created_at"]
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 32 // 4 * 4
    assert job["metadata"] == {"case": method} and job["seed"] == 7

    events = all_events(client, job["id"])
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert len(metrics) == job["progress"]["total_steps"]
    losses = [m["train_loss"] for m in metrics]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    valid_losses = [m["valid_loss"] for m in metrics if "valid_loss" in m]
    # Every method lowers the tiny model's validation loss by 0.35-3 nats here, in float32 and bfloat16
    # (tests/tiny_model.py says why it can); 0.2 is well above run-to-run noise and well below what they learn.
    assert len(valid_losses) >= 2 and valid_losses[-1] < valid_losses[0] - 0.2, valid_losses
    report = job["result"]
    assert report["full_valid_loss"] < report["base_model"]["full_valid_loss"] - 1.0, report
    assert {"step", "train_loss", "learning_rate", "epoch"} <= set(metrics[-1])
    assert events[-1]["message"] == "The job has successfully completed."

    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [32, 24, 16, 8]
    assert all("train_loss" in c["metrics"] and "valid_loss" in c["metrics"] for c in checkpoints)

    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[name]["parent"] == TINY_MODEL_ID
    assert checkpoints[-1]["fine_tuned_model_checkpoint"] in models

    base_reply = chat(client, TINY_MODEL_ID)["choices"][0]["message"]["content"]
    tuned = chat(client, name)
    tuned_reply = tuned["choices"][0]["message"]["content"]
    assert tuned_reply != base_reply
    # A checkpoint is servable too.
    chat(client, checkpoints[-1]["fine_tuned_model_checkpoint"])

    # This test process never loaded the adapter: reload it here and compare with PEFT's own loader.
    from transformers import AutoModelForCausalLM

    from adapters.engine import AdapterRef, BaseRuntime

    folder = adapter_folder(stack, name)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    runtime = BaseRuntime(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tokenizer, cache_size=2,
                          max_rank=64)
    adapter = runtime.adapters.load(AdapterRef(key="x", folder=folder, base_model=TINY_MODEL_ID))
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Say hi 999"}], tokenize=False,
                                                add_generation_prompt=True)
    ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reference = peft_reference(tiny_model_dir, folder)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert torch.allclose(runtime.logits(ids, adapter), expected.logits[0, -len(ids):], atol=1e-4)
    # Greedy decoding with PEFT (full forward each step) gives the text the API returned.
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(tuned["usage"]["completion_tokens"]):
            logits = reference(input_ids=torch.tensor([sequence])).logits[0, -1]
            sequence.append(int(logits.argmax()))
    assert tiny_tokenizer.decode(sequence[len(ids):], skip_special_tokens=True) == tuned_reply


def test_cancel_queued_running_twice_and_finished(client: httpx.Client) -> None:
    long_file = upload(client, chat_lines(200)).json()["id"]
    long_hp = {"method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}}
    running = create_job(client, {"model": TINY_MODEL_ID, "training_file": long_file, **long_hp}).json()
    queued = create_job(client, {"model": TINY_MODEL_ID, "training_file": long_file, **long_hp}).json()
    wait_for_status(client, running["id"], {"running"}, timeout=60)

    # The file is in use by unfinished jobs: deleting it is refused, not silently breaking them.
    assert client.delete(f"/v1/files/{long_file}").status_code == 409

    cancelled = client.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    assert client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel").status_code == 200
    done = wait_for_status(client, running["id"], {"cancelled", "succeeded", "failed"}, timeout=30)
    assert done["status"] == "cancelled" and done["fine_tuned_model"] is None
    assert done["progress"]["total_steps"] == 200 * 50
    assert done["progress"]["step"] < done["progress"]["total_steps"]

    again = client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_cancellable"
    # The cancelled queued job is never trained when its message reaches the worker.
    assert client.get(f"/v1/fine_tuning/jobs/{queued['id']}").json()["status"] == "cancelled"
    assert client.delete(f"/v1/files/{long_file}").status_code == 200


@pytest.mark.sqlite_e2e
def test_concurrent_requests_with_one_idempotency_key_create_one_job(client: httpx.Client,
                                                                    training_file: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": TINY_MODEL_ID, "training_file": training_file, "hyperparameters": {"n_epochs": 1}}
    before = {j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]}

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=str(client.base_url), timeout=budget(60), headers=AUTH) as own:
            return own.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "concurrent-key"})

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(send, range(6)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    after = {j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]}
    assert len(after - before) == 1
    wait_for_status(client, responses[0].json()["id"], {"succeeded", "failed", "cancelled"})


# ------------------------------------------------------------------ tools: fine-tuned to call, then served calling

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}


def tool_call_lines(n: int) -> str:
    """OpenAI's fine-tuning format for function calling: each question answered by a call of get_weather."""
    import json

    return "\n".join(json.dumps({"tools": [TOOL], "messages": [
        {"role": "user", "content": f"Weather please {i}"},
        {"role": "assistant", "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]}) for i in range(n)) + "\n"


def test_a_model_fine_tuned_on_tool_calls_is_served_calling_the_tool(client: httpx.Client, stack: Stack) -> None:
    """A tool-calling dataset trains like any other. Served with tool_choice auto (nothing forced), the tuned model
    answers in the call convention it learned; with "required" its call is always well formed and carries the
    arguments it learned, where the base model's forced call carries noise."""
    train = upload(client, tool_call_lines(32))
    assert train.status_code == 200, train.text
    job = create_job(client, {"model": TINY_MODEL_ID, "training_file": train.json()["id"], "suffix": "tools",
                              "seed": 7, "method": {"type": "lora", "lora": {
                                  "hyperparameters": method_hyperparameters("lora")}}}).json()
    job = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", f"{job}\n{stack.log_tail('worker')}"
    asked = {"messages": [{"role": "user", "content": "Weather please 999"}], "tools": [TOOL], "max_tokens": 60,
             "temperature": 0}

    def answer(model: str, **fields: Any) -> dict[str, Any]:
        response = client.post("/v1/chat/completions", json={**asked, "model": model, **fields})
        assert response.status_code == 200, response.text
        return dict(response.json()["choices"][0])

    tuned = job["fine_tuned_model"]
    auto = answer(tuned)
    # The tiny model may not copy every token of the call exactly (it is then text that starts like one).
    assert auto["message"]["tool_calls"] or auto["message"]["content"].startswith("<tool_call>\n{"), auto
    forced = answer(tuned, tool_choice="required")
    assert forced["finish_reason"] == "tool_calls", forced
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in forced["message"]["tool_calls"]] == [
        ("get_weather", '{"city": "Oslo"}')]
    base = answer(TINY_MODEL_ID, tool_choice="required", parallel_tool_calls=False)  # noise could call on and on
    assert base["finish_reason"] == "tool_calls", base
    assert [c["function"]["name"] for c in base["message"]["tool_calls"]] == ["get_weather"]
    assert base["message"]["tool_calls"][0]["function"]["arguments"] != '{"city": "Oslo"}'
    assert answer(TINY_MODEL_ID)["message"]["tool_calls"] is None
