"""Every base-model family through the API and a real worker: each family's tiny model declared in
ADAPTERY_BASE_MODELS, listed by /v1/models with its family, fine-tuned with LoRA by the worker, and its model
answering a chat; a LoRA made by plain PEFT on a non-Llama family imported and served as PEFT computes it.
The engine against PEFT at every decode step, per family and method, is tests/adapters/test_families.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.adapters_made_with_peft import files_of, greedy_text
from tests.budgets import JOB_DONE, budget
from tests.conftest import (
    ADMIN_KEY,
    AUTH,
    MODEL_CACHE,
    Stack,
    all_events,
    chat_lines,
    running_stack,
    upload,
    wait_for_status,
)
from tests.families import FAMILIES, build_family_model
from tests.tiny_model import TINY_MODEL_ID

IMPORTED_FAMILY = "qwen2"  # tied head, q/k/v biases: unlike the Llama the rest of the suite uses


def model_id(family: str) -> str:
    return f"tiny-{family}"


@pytest.fixture(scope="module")
def family_folders(tiny_model_dir: Path) -> dict[str, Path]:
    return {family: build_family_model(MODEL_CACHE, family, str(tiny_model_dir)) for family in FAMILIES}


@pytest.fixture(scope="module")
def families_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, family_folders: dict[str, Path],
                   redis_url: str, database_url: str) -> Iterator[Stack]:
    declared = {TINY_MODEL_ID: str(tiny_model_dir), **{model_id(f): str(p) for f, p in family_folders.items()}}
    with running_stack(tmp_path_factory.mktemp("families"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra={"ADAPTERY_BASE_MODELS": json.dumps(declared),
                                                             "ADAPTERY_WORKER_QUEUE_REFRESH_SECONDS": "1"}) as stack:
        yield stack


@pytest.fixture(scope="module")
def api(families_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=families_stack.base_url, headers=AUTH, timeout=budget(60)) as client:
        yield client


@pytest.fixture(scope="module")
def fine_tuned(api: httpx.Client) -> dict[str, str]:
    """A LoRA job per family, all submitted before any is awaited (one worker trains them in turn)."""
    file_id = upload(api, chat_lines(8)).json()["id"]
    jobs = {}
    for family in FAMILIES:
        response = api.post("/v1/fine_tuning/jobs", json={
            "model": model_id(family), "training_file": file_id, "suffix": family.replace("_", "-"),
            "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 4,
                                                                     "learning_rate": 0.01}}}})
        assert response.status_code == 200, (family, response.text)
        jobs[family] = response.json()["id"]
    models = {}
    deadline = time.monotonic() + budget(JOB_DONE) * len(jobs)
    for family, job_id in jobs.items():
        while True:
            job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"{family}: still {job['status']}"
            time.sleep(0.3)
        assert job["status"] == "succeeded", (family, job.get("error"))
        models[family] = job["fine_tuned_model"]
        batching = [e["data"] for e in all_events(api, job_id) if "attention" in (e.get("data") or {})]
        # Gemma 2 soft-caps its attention scores, which SDPA cannot: it trains with its eager attention, and says so.
        assert batching == [{"packed": True, "attention": "eager" if family == "gemma2" else "sdpa"}], batching
    return models


def test_every_family_is_listed_with_its_family(api: httpx.Client, family_folders: dict[str, Path]) -> None:
    listed = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    for family, folder in family_folders.items():
        entry = listed[model_id(family)]
        assert entry["family"] == json.loads((folder / "config.json").read_text())["model_type"], entry
        assert entry["parameters"] > 0 and "lora" in entry["methods"], entry


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_fine_tunes_through_the_worker_and_answers(api: httpx.Client, fine_tuned: dict[str, str],
                                                               family: str) -> None:
    model = fine_tuned[family]
    assert model.startswith(f"ft:{model_id(family)}:")
    reply = api.post("/v1/chat/completions", json={"model": model, "max_tokens": 6, "temperature": 0,
                                                   "messages": [{"role": "user", "content": "Say hi 3"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


def test_a_plain_peft_adapter_of_another_family_imports_and_serves_as_peft(
        api: httpx.Client, family_folders: dict[str, Path], tmp_path: Path, tiny_tokenizer: Any) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = family_folders[IMPORTED_FAMILY]
    torch.manual_seed(5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "plain")
    form = {"name": f"plain-{IMPORTED_FAMILY}", "base_model": model_id(IMPORTED_FAMILY)}
    response = api.post("/v1/adapters", data=form,
                        files=[("files", (name, data)) for name, data in files_of(tmp_path / "plain").items()])
    assert response.status_code == 200, response.text
    reply = api.post("/v1/chat/completions", json={"model": f"plain-{IMPORTED_FAMILY}", "max_tokens": 6,
                                                   "temperature": 0,
                                                   "messages": [{"role": "user", "content": "Hello"}]})
    assert reply.status_code == 200, reply.text
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(tmp_path / "plain")).eval()
    expected = greedy_text(reference, tiny_tokenizer, "Hello", reply.json()["usage"]["completion_tokens"])
    assert reply.json()["choices"][0]["message"]["content"] == expected


def test_method_defaults_follow_each_familys_structure(api: httpx.Client) -> None:
    """The catalogue shows, per base model, the projections its family has (not Llama's names)."""
    expected = {  # LoRA's targets; IA³'s scaled modules and the feed-forward ones whose input it scales
        "phi3": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["qkv_proj", "down_proj"], ["down_proj"]),
        "gpt_neox": (["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                     ["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    }
    for family, (lora_targets, ia3_targets, ia3_feedforward) in expected.items():
        listed = api.get("/v1/fine_tuning/methods", params={"model": model_id(family)})
        assert listed.status_code == 200, listed.text
        defaults = {m["id"]: m["defaults"] for m in listed.json()["data"]}
        assert sorted(defaults["lora"]["target_modules"]) == sorted(lora_targets), (family, defaults["lora"])
        assert sorted(defaults["ia3"]["target_modules"]) == sorted(ia3_targets), (family, defaults["ia3"])
        assert defaults["ia3"]["feedforward_modules"] == ia3_feedforward, (family, defaults["ia3"])


def test_a_model_registered_while_the_worker_runs_is_trained_without_a_restart(
        api: httpx.Client, families_stack: Stack, family_folders: dict[str, Path]) -> None:
    registered = api.post("/v1/admin/base_models", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                          json={"id": "registered-later", "source": str(family_folders["olmo2"])})
    assert registered.status_code == 200, registered.text
    file_id = upload(api, chat_lines(8)).json()["id"]
    job = api.post("/v1/fine_tuning/jobs", json={"model": "registered-later", "training_file": file_id,
                                                 "hyperparameters": {"n_epochs": 1, "batch_size": 4}})
    assert job.status_code == 200, job.text
    # The worker looks for new base models every second here (ADAPTERY_WORKER_QUEUE_REFRESH_SECONDS) and starts
    # consuming the new model's queue; before, the job waited until the worker was restarted.
    finished = wait_for_status(api, job.json()["id"], {"succeeded", "failed", "cancelled"})
    assert finished["status"] == "succeeded", finished.get("error")
    assert "now consumes train." in families_stack.log_tail("worker", 200_000)
