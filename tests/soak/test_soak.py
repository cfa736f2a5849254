"""Soak (`make soak`, bounded in time): jobs keep arriving while workers are killed with -9 and Redis is
restarted at random. At the end every accepted job is terminal, and no job ever trained on two workers
at once. Prints its figures as a JSON line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, all_events, chat_lines, free_port, make_stack, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID

pytestmark = pytest.mark.soak
CHAOS_SECONDS = float(os.environ.get("ADAPTERY_SOAK_SECONDS", "90"))
JOBS = int(os.environ.get("ADAPTERY_SOAK_JOBS", "16"))


def segments_are_monotonic(events: list[dict[str, Any]]) -> bool:
    """Within one attempt, metric steps only go up; two workers training at once would interleave."""
    last = 0
    for event in events:
        if event["message"].startswith("Fine-tuning job started"):
            last = 0
        elif event["type"] == "metrics":
            if event["data"]["step"] <= last:
                return False
            last = event["data"]["step"]
    return True


def test_soak(tmp_path: Path, tiny_model_dir: Path, database_url: str) -> None:
    rng = random.Random(7)
    port = free_port()
    redis_cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    redis = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
    stack = make_stack(tmp_path, database_url=database_url, broker_url=f"redis://127.0.0.1:{port}/0",
                       tiny_model_dir=tiny_model_dir,
                       extra={"ADAPTERY_LEASE_SECONDS": "3", "ADAPTERY_REAPER_INTERVAL_SECONDS": "0.5",
                              "ADAPTERY_CHECKPOINT_STEPS": "4", "ADAPTERY_REQUEUE_AFTER_SECONDS": "5",
                              "ADAPTERY_FAULT_INJECTION": "step_delay=0.05"})
    counts = {"worker_kills": 0, "redis_restarts": 0}
    accepted: list[str] = []
    started = time.monotonic()
    try:
        stack.start_api()
        workers = ["w0", "w1"]
        for name in workers:
            stack.start_worker(name)
        stack.wait_ready()
        with stack.client() as client:
            file_id = upload(client, chat_lines(16)).json()["id"]
            next_job, next_chaos, generation = 0.0, time.monotonic() + 3, 2
            while time.monotonic() - started < CHAOS_SECONDS:
                now = time.monotonic()
                if len(accepted) < JOBS and now >= next_job:
                    response = client.post("/v1/fine_tuning/jobs", json={
                        "model": TINY_MODEL_ID, "training_file": file_id, "seed": len(accepted),
                        "hyperparameters": {"n_epochs": 2, "batch_size": 2}})
                    if response.status_code == 200:
                        accepted.append(response.json()["id"])
                    next_job = now + rng.uniform(1, 4)
                if now >= next_chaos:
                    if rng.random() < 0.7:
                        victim = rng.choice(workers)
                        stack.kill(victim)
                        workers.remove(victim)
                        replacement = f"w{generation}"
                        generation += 1
                        stack.start_worker(replacement)
                        workers.append(replacement)
                        counts["worker_kills"] += 1
                    else:
                        redis.kill()
                        redis.wait(timeout=10)
                        time.sleep(rng.uniform(0.5, 3))
                        redis = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
                        counts["redis_restarts"] += 1
                    next_chaos = now + rng.uniform(3, 8)
                time.sleep(0.2)
            finals = {job_id: wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=300)
                      for job_id in accepted}
            events = {job_id: all_events(client, job_id) for job_id in accepted}
    finally:
        stack.stop_all()
        redis.kill()
        redis.wait(timeout=10)
    monotonic = {job_id: segments_are_monotonic(job_events) for job_id, job_events in events.items()}
    resumed = sum(any("resumed_from_step" in (e.get("data") or {}) for e in job_events)
                  for job_events in events.values())
    statuses = [job["status"] for job in finals.values()]
    result = {"seconds": round(time.monotonic() - started, 1), "accepted": len(accepted),
              "terminal": sum(s in ("succeeded", "failed", "cancelled") for s in statuses),
              "succeeded": statuses.count("succeeded"), "failed": statuses.count("failed"),
              "resumed_from_checkpoint": resumed, **counts,
              "no_concurrent_training": all(monotonic.values())}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    assert result["accepted"] == result["terminal"] == JOBS
    assert result["no_concurrent_training"]
    assert counts["worker_kills"] + counts["redis_restarts"] >= 5
