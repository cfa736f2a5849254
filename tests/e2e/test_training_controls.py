"""What a job reports about its quality and the controls users of hosted services rely on, end to end through
the real API and a real worker: checkpoint metrics and the end report against the base model, curves as
TensorBoard files and JSON, early stopping that keeps the best checkpoint, learning-rate schedules, starting
from an earlier fine-tuned model, and estimated_finish. Refusals that need no trained model are checked in this
process: tests/api/test_jobs.py."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.budgets import budget
from tests.conftest import Stack, all_events, chat_lines, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID

LORA_FAST = {"learning_rate": 0.02, "batch_size": 4}


def file_id(client: httpx.Client, content: str) -> str:
    response = upload(client, content)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def start(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def lora(**hyperparameters: Any) -> dict[str, Any]:
    return {"type": "lora", "lora": {"hyperparameters": {**LORA_FAST, **hyperparameters}}}


def adapter_weights(client: httpx.Client, stack: Stack, name: str) -> dict[str, torch.Tensor]:
    adapters = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    return load_file(str(stack.data_dir / "adapters" / adapters[name]["id"] / "adapter_model.safetensors"))


def metric_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in all_events(client, job_id) if e["type"] == "metrics" and "total_steps" in e["data"]]


@pytest.fixture(scope="module")
def files(client: httpx.Client) -> dict[str, str]:
    return {"train": file_id(client, chat_lines(24)), "valid": file_id(client, chat_lines(8, start=100)),
            # Other answers to the same prompts: training on "train" makes these less likely, so a model that
            # learns "train" fast gets worse on this validation set (what early stopping watches for).
            "contrary": file_id(client, chat_lines(8, answer="GOODBYE MOON", start=0))}


@pytest.fixture(scope="module")
def finished(client: httpx.Client, files: dict[str, str]) -> dict[str, Any]:
    """One job with a validation file, trained to the end."""
    job = start(client, training_file=files["train"], validation_file=files["valid"], method=lora(n_epochs=2))
    return wait_for_status(client, job["id"], {"succeeded", "failed"})


def test_checkpoints_and_end_report_compare_with_the_base_model(client: httpx.Client,
                                                                finished: dict[str, Any]) -> None:
    assert finished["status"] == "succeeded", finished
    result = finished["result"]
    assert result["step"] == finished["progress"]["total_steps"] == 12 and result["stopped_early"] is False
    base = result["base_model"]
    # The task is learnable and the base model is random: the adapter must beat it on every measure.
    assert result["full_valid_loss"] < base["full_valid_loss"]
    assert result["full_valid_mean_token_accuracy"] > base["full_valid_mean_token_accuracy"]
    assert 0 <= base["full_valid_exact_match"] <= result["full_valid_exact_match"] <= 1
    assert result["valid_examples"] == result["exact_match_examples"] == 8
    assert 0 <= result["train_mean_token_accuracy"] <= 1 and result["train_loss"] > 0

    checkpoints = client.get(f"/v1/fine_tuning/jobs/{finished['id']}/checkpoints").json()["data"]
    assert checkpoints, "every epoch end is a checkpoint"
    for checkpoint in checkpoints:
        metrics = checkpoint["metrics"]
        assert {"train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"} <= set(metrics)
    final = next(c for c in checkpoints if c["step_number"] == result["step"])["metrics"]
    assert final["full_valid_loss"] == result["full_valid_loss"]
    assert final["full_valid_mean_token_accuracy"] == result["full_valid_mean_token_accuracy"]
    # The periodic validation at the last step scored the same (whole, small) set as the end report.
    assert final["valid_loss"] == pytest.approx(result["full_valid_loss"], abs=1e-3)

    report = [e for e in all_events(client, finished["id"]) if e["data"].get("phase") == "end_report"]
    assert len(report) == 1 and "base model" in report[0]["message"]


def test_curves_as_tensorboard_files_and_json(client: httpx.Client, stack: Stack, finished: dict[str, Any]) -> None:
    job_id = finished["id"]
    assert list((stack.data_dir / "tensorboard" / job_id).glob("events.out.tfevents.*"))
    series = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics")
    assert series.status_code == 200, series.text
    points = series.json()["data"]
    events = {m["step"]: m for m in metric_events(client, job_id)}
    assert [p["step"] for p in points] == sorted(events) == list(range(1, 13))
    for point in points:
        logged = events[point["step"]]
        for name in ("train_loss", "train_mean_token_accuracy", "learning_rate", "grad_norm", "tokens_per_second"):
            assert point[name] == pytest.approx(logged[name], rel=1e-5), name
        assert (point["valid_loss"] is None) == ("valid_loss" not in logged)
    assert any(p["valid_loss"] is not None for p in points)
    # The TensorBoard files on the worker's host hold the same curves.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written: dict[int, float] = {}
    for file in (stack.data_dir / "tensorboard" / job_id).glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0})
        accumulator.Reload()
        written.update({s.step: s.value for s in accumulator.Scalars("train_loss")})
    assert written == pytest.approx({p["step"]: p["train_loss"] for p in points}, rel=1e-5)
    window = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"from_step": 3, "to_step": 5}).json()
    assert [p["step"] for p in window["data"]] == [3, 4, 5]
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"from_step": -1}).status_code == 400
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope/metrics").status_code == 404


def test_early_stopping_keeps_the_best_checkpoint(client: httpx.Client, stack: Stack, files: dict[str, str]) -> None:
    # Room to stop in: the contrary validation loss first falls while the model learns what both files share (the
    # turn's format), then rises; where it turns depends on the CPU's dtype (step 9 of 30 in bf16 on an AVX-512
    # EPYC; once, on an AMX Xeon, not before the end of 5 epochs). Ten epochs leave that room, and a job that stops
    # early costs no more for them.
    job = start(client, training_file=files["train"], validation_file=files["contrary"],
                method=lora(n_epochs=10, early_stopping_patience=2, learning_rate=0.05))
    done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    result = done["result"]
    validations = [(m["step"], m["valid_loss"]) for m in metric_events(client, job["id"]) if "valid_loss" in m]
    best_step, best_loss = min(validations, key=lambda v: v[1])
    assert result["stopped_early"] is True and done["progress"]["step"] < done["progress"]["total_steps"]
    assert result["step"] == best_step and validations[-1][0] == done["progress"]["step"]
    # Patience 2: it stopped at the second validation after the best, neither of them better.
    assert validations[-3][0] == best_step
    assert all(loss >= best_loss for _, loss in validations[-2:])
    checkpoints = {c["step_number"]: c for c in client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints",
                                                           params={"limit": 100}).json()["data"]}
    assert best_step in checkpoints
    final = adapter_weights(client, stack, done["fine_tuned_model"])
    best = adapter_weights(client, stack, checkpoints[best_step]["fine_tuned_model_checkpoint"])
    last = adapter_weights(client, stack, checkpoints[max(checkpoints)]["fine_tuned_model_checkpoint"])
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert any(not torch.equal(final[k], last[k]) for k in last)
    assert result["full_valid_loss"] == pytest.approx(best_loss, abs=1e-3)
    assert any("Early stopping" in e["message"] for e in all_events(client, job["id"]))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedules(client: httpx.Client, files: dict[str, str], schedule: str) -> None:
    job = start(client, training_file=files["train"], method=lora(n_epochs=2, lr_scheduler=schedule,
                                                                  warmup_ratio=0.25, learning_rate=0.01))
    done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["method"]["lora"]["hyperparameters"]["lr_scheduler"] == schedule
    rates = [m["learning_rate"] for m in sorted(metric_events(client, job["id"]), key=lambda m: m["step"])]
    total, warmup = 12, 3
    # The rate logged after step s is the one step s + 1 uses.
    for step, rate in enumerate(rates, start=1):
        if step < warmup:
            expected = 0.01 * step / warmup
        elif schedule == "constant":
            expected = 0.01
        else:
            expected = 0.01 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert rate == pytest.approx(expected, abs=1e-9), (step, rates)


def test_a_job_continues_from_a_fine_tuned_model(client: httpx.Client, stack: Stack, files: dict[str, str],
                                                 finished: dict[str, Any]) -> None:
    source = finished["fine_tuned_model"]
    # No method: the source's method and shape; a learning rate too small to move the weights in float32.
    job = start(client, training_file=files["train"], from_model=source,
                hyperparameters={"n_epochs": 1, "learning_rate": 1e-12})
    done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["from_model"] == source and done["method"]["type"] == "lora"
    source_shape = finished["method"]["lora"]["hyperparameters"]
    for key in ("r", "lora_alpha", "target_modules"):
        assert done["method"]["lora"]["hyperparameters"][key] == source_shape[key]
    continued = adapter_weights(client, stack, done["fine_tuned_model"])
    original = adapter_weights(client, stack, source)
    assert set(continued) == set(original)
    assert all(torch.allclose(continued[k], original[k], atol=1e-6) for k in original)
    assert any(f"Starting from the weights of {source}" in e["message"] for e in all_events(client, job["id"]))
    # Its first step starts where the source ended, below an untrained adapter's first loss.
    first = min(metric_events(client, job["id"]), key=lambda m: m["step"])["train_loss"]
    fresh = min(metric_events(client, finished["id"]), key=lambda m: m["step"])["train_loss"]
    assert first < fresh - 0.5


# Those that need a trained source model; an unknown from_model is refused in tests/api/test_jobs.py.
REFUSALS = [
    ({"from_model": "{source}", "method": {"type": "ia3"}}, 400, "method.type"),
    ({"from_model": "{source}", "method": {"type": "lora", "lora": {"hyperparameters": {"r": 4}}}}, 400,
     "method.lora.hyperparameters.r"),
]


@pytest.mark.parametrize(("body", "status", "param"), REFUSALS)
def test_from_model_refusals_name_the_field(client: httpx.Client, files: dict[str, str], finished: dict[str, Any],
                                            body: dict[str, Any], status: int, param: str) -> None:
    body = json.loads(json.dumps(body).replace("{source}", finished["fine_tuned_model"]))
    response = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": files["train"],
                                                         **body})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_estimated_finish_while_running(stack: Stack, files: dict[str, str]) -> None:
    # The module's worker steps aside, so the job goes to one whose steps take 0.3 s more.
    worker = "slow_worker"
    stack.stop("worker")
    stack.start_worker(worker, env={"ADAPTERY_FAULT_INJECTION": "step_delay=0.3"})
    try:
        with stack.client() as client:
            stack.wait_workers_ready(worker)
            job = start(client, training_file=files["train"], method=lora(n_epochs=4))
            deadline = time.monotonic() + budget(120)
            seen: dict[str, Any] = {}
            while time.monotonic() < deadline:
                seen = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                if seen["status"] == "running" and seen["progress"]["step"] >= 3:
                    break
                time.sleep(0.2)
            now = time.time()
            remaining = seen["progress"]["total_steps"] - seen["progress"]["step"]
            assert seen["estimated_finish"] is not None, seen
            # About 0.3 s (plus compute, scaled to this machine) per remaining step from now; the estimate is
            # as old as the last progress write.
            assert now - budget(2) <= seen["estimated_finish"] <= now + remaining * budget(0.3 * 3) + budget(2)
            done = wait_for_status(client, job["id"], {"succeeded", "failed"})
            assert done["estimated_finish"] is None
    finally:
        stack.stop(worker)
        stack.start_worker()
        stack.wait_workers_ready("worker")
