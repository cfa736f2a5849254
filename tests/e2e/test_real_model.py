"""LoRA on the real SmolLM2-135M-Instruct, end to end: the shipped example dataset is learned, and the
adapter answers held-out prompts correctly where the base model does not.

The accuracies are written to .cache/real_model_result.json and printed, for the README.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from app.settings import DEFAULT_BASE_MODEL
from tests.conftest import ROOT, Stack, make_stack, upload, wait_for_status

EXAMPLES = ROOT / "examples"
TRAIN_FILE = EXAMPLES / "sentiment_train.jsonl"
HELDOUT_FILE = EXAMPLES / "sentiment_heldout.jsonl"
HYPERPARAMETERS = {"n_epochs": 3, "batch_size": 4, "learning_rate": 1e-3, "r": 8, "lora_alpha": 16}
# A fairer baseline than the bare prompt: the base model told exactly what to answer.
INSTRUCTION = "Classify the sentiment of the review. Answer with exactly one word: POSITIVE or NEGATIVE."
MIN_ADAPTER_ACCURACY = 0.85
MAX_BASE_ACCURACY = 0.30


def normalise(text: str) -> str:
    return text.strip().strip(".!").upper()


def accuracy(client: Any, model: str, heldout: list[dict[str, Any]], instruction: str | None = None
             ) -> tuple[float, list[str]]:
    answers = []
    for example in heldout:
        prompt = [m for m in example["messages"] if m["role"] != "assistant"]
        if instruction:
            prompt = [{"role": "system", "content": instruction}, *prompt]
        reply = client.post("/v1/chat/completions", json={
            "model": model, "messages": prompt, "max_tokens": 6, "temperature": 0}).json()
        answers.append(reply["choices"][0]["message"]["content"])
    expected = [example["messages"][-1]["content"] for example in heldout]
    right = sum(normalise(a) == normalise(e) for a, e in zip(answers, expected, strict=True))
    return right / len(heldout), answers


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
               postgres_url: str) -> Any:
    tmp = tmp_path_factory.mktemp("real")
    stack: Stack = make_stack(tmp, database_url=f"sqlite:///{tmp / 'adaptery.db'}", broker_url=redis_url,
                              tiny_model_dir=tiny_model_dir,
                              extra={"ADAPTERY_DEFAULT_BASE_MODEL": DEFAULT_BASE_MODEL,
                                     "ADAPTERY_TORCH_THREADS": "2"})
    stack.start_api()
    stack.start_worker()
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop_all()


def test_lora_on_smollm2_learns_the_shipped_task(real_stack: Stack) -> None:
    heldout = [json.loads(line) for line in HELDOUT_FILE.read_text().splitlines() if line.strip()]
    train_inputs = {json.loads(line)["messages"][0]["content"] for line in TRAIN_FILE.read_text().splitlines()}
    assert not train_inputs & {e["messages"][0]["content"] for e in heldout}, "held-out prompts must be unseen"

    with real_stack.client(timeout=300) as client:
        file = upload(client, TRAIN_FILE.read_bytes(), filename=TRAIN_FILE.name).json()
        assert file["n_examples"] >= 60
        started = time.monotonic()
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": DEFAULT_BASE_MODEL, "training_file": file["id"], "suffix": "sentiment", "seed": 1,
            "method": {"type": "lora", "lora": {"hyperparameters": HYPERPARAMETERS}}}).json()
        job = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=900)
        train_seconds = time.monotonic() - started
        assert job["status"] == "succeeded", f"{job}\n{real_stack.log_tail('worker')}"

        base_accuracy, base_answers = accuracy(client, DEFAULT_BASE_MODEL, heldout)
        instructed_accuracy, instructed_answers = accuracy(client, DEFAULT_BASE_MODEL, heldout, INSTRUCTION)
        tuned_accuracy, tuned_answers = accuracy(client, job["fine_tuned_model"], heldout)

    result = {"base_accuracy": base_accuracy, "base_instructed_accuracy": instructed_accuracy,
              "adapter_accuracy": tuned_accuracy, "heldout": len(heldout),
              "train_examples": file["n_examples"], "steps": job["progress"]["total_steps"],
              "train_seconds": round(train_seconds, 1), "hyperparameters": HYPERPARAMETERS,
              "base_answers_sample": base_answers[:3], "base_instructed_answers_sample": instructed_answers[:3],
              "adapter_answers_sample": tuned_answers[:3]}
    (ROOT / ".cache").mkdir(exist_ok=True)
    (ROOT / ".cache" / "real_model_result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    assert tuned_accuracy >= MIN_ADAPTER_ACCURACY, result
    assert base_accuracy <= MAX_BASE_ACCURACY, result
    assert tuned_accuracy > instructed_accuracy, result
