"""`adaptery serve` on its embedded defaults (what `make run` starts): SQLite, no broker server, a real
Celery worker process it supervises, and the whole upload → train → serve path over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests import budgets
from tests.budgets import budget
from tests.conftest import AUTH, ROOT, chat_lines, free_port, stack_env, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID


@contextmanager
def serving(tmp_path: Path, tiny_model_dir: Path, extra: dict[str, str] | None = None
            ) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes], Path]]:
    """`python -m app.cli serve` on embedded defaults, ready; stopped with SIGTERM as a user would."""
    port = free_port()
    env = stack_env(tmp_path / "data", database_url="", broker_url="", tiny_model_dir=tiny_model_dir, port=port,
                    extra=extra)
    del env["ADAPTERY_DATABASE_URL"], env["ADAPTERY_BROKER_URL"]
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=budget(60), headers=AUTH) as client:
            deadline = time.monotonic() + budget(budgets.STACK_READY)
            while time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text()
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise AssertionError(log_path.read_text()[-3000:])
            yield client, process, log_path
    finally:
        process.send_signal(signal.SIGTERM)  # serve stops its worker, then exits
        try:
            process.wait(timeout=budget(40))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    assert process.returncode is not None


def test_serve_with_embedded_broker(tmp_path: Path, tiny_model_dir: Path) -> None:
    with serving(tmp_path, tiny_model_dir) as (client, _, log_path):
        assert (tmp_path / "data" / "adaptery.db").exists() and (tmp_path / "data" / "broker.db").exists()
        file_id = upload(client, chat_lines(16)).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": TINY_MODEL_ID, "training_file": file_id,
            "hyperparameters": {"n_epochs": 2, "batch_size": 4}}).json()
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
        assert done["status"] == "succeeded", log_path.read_text()[-3000:]
        reply = client.post("/v1/chat/completions", json={
            "model": done["fine_tuned_model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
        output = log_path.read_text()
        assert f"{str(client.base_url).rstrip('/')}/docs" in output and "embedded" in output


def test_serve_replaces_a_killed_worker_and_the_job_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`make run` supervises its worker: kill -9 it mid-job, and the job finishes without anyone stepping in."""
    extra = {"ADAPTERY_LEASE_SECONDS": "3", "ADAPTERY_REAPER_INTERVAL_SECONDS": "0.5",
             "ADAPTERY_CHECKPOINT_STEPS": "5", "ADAPTERY_FAULT_INJECTION": "step_delay=0.15"}
    with serving(tmp_path, tiny_model_dir, extra) as (client, process, log_path):
        file_id = upload(client, chat_lines(40)).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": TINY_MODEL_ID, "training_file": file_id,
            "hyperparameters": {"n_epochs": 1, "batch_size": 2}}).json()
        deadline = time.monotonic() + budget(60)
        while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 7:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-P", str(process.pid), "-f", "celery"], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 1
        os.killpg(int(workers[0]), signal.SIGKILL)  # the worker and its pool, as the OOM killer would
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
        assert done["status"] == "succeeded", log_path.read_text()[-3000:]
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 200}).json()["data"]
        resumed = [e["data"]["resumed_from_step"] for e in events if "resumed_from_step" in e["data"]]
        assert resumed and resumed[0] >= 5
        assert "starting a new one" in log_path.read_text()


def engine_processes(serve: subprocess.Popen[bytes]) -> list[str]:
    """The pids of `serve`'s serving-engine children (role inference)."""
    return subprocess.run(["pgrep", "-P", str(serve.pid), "-f", "role inference"], capture_output=True,
                          text=True).stdout.split()


def test_serve_runs_its_engine_apart_and_replaces_it_when_killed(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`make run`'s engine is a supervised process of its own (role inference behind this one, on loopback): kill -9
    it, and chat answers 503 while it is gone (never a 500, never a hang) and 200 again once it is back."""
    ask = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with serving(tmp_path, tiny_model_dir) as (client, process, log_path):
        assert client.post("/v1/chat/completions", json=ask).status_code == 200
        engines = engine_processes(process)
        assert len(engines) == 1, log_path.read_text()[-3000:]
        os.killpg(int(engines[0]), signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + budget(budgets.STACK_READY)
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, (statuses, log_path.read_text()[-3000:])
            statuses.append(client.post("/v1/chat/completions", json=ask).status_code)
            time.sleep(0.2)
        assert set(statuses) <= {200, 503}, statuses
        assert "serving engine exited with -9; starting a new one" in log_path.read_text()
        replaced = engine_processes(process)
        assert len(replaced) == 1 and replaced != engines


def test_serve_can_keep_its_engine_in_the_api_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    """ADAPTERY_INFERENCE_PROCESS=false: one process serves the API and the engine, as before."""
    with serving(tmp_path, tiny_model_dir, {"ADAPTERY_INFERENCE_PROCESS": "false"}) as (client, process, _):
        ask = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert client.post("/v1/chat/completions", json=ask).status_code == 200
        assert not engine_processes(process)
