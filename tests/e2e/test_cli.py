"""The `adaptery` client verbs as a user runs them: subprocesses against the real API and a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.budgets import budget
from tests.conftest import ROOT, TEST_KEY, Stack, chat_lines, free_port, running_stack, wait_for_status

# Keep-alive comments every 0.2 s and steps of at least 0.3 s: the streams `jobs watch` and `chat` read carry
# keep-alives between their events, as any stream does that is quiet for long (the server's default is 15 s).
QUIET_STREAMS = {"ADAPTERY_EVENT_STREAM_PING_SECONDS": "0.2", "ADAPTERY_FAULT_INJECTION": "step_delay=0.3"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
          database_url: str) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("cli-stack"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra=QUIET_STREAMS) as running:
        yield running


def adaptery(stack: Stack, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**stack.env, "ADAPTERY_API_URL": stack.base_url, "ADAPTERY_API_KEY": TEST_KEY,
                   "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=budget(timeout))


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess[str], *, after_progress: bool = False) -> str:
    """The error line; alone on stderr, or (`jobs watch`) the last line after the job's events and bar."""
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert (after_progress or len(lines) == 1) and lines[-1].startswith("error: "), done.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, done.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def training_file(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli") / "train.jsonl"
    path.write_text(chat_lines(12))
    uploaded = as_json(adaptery(stack, "--json", "files", "upload", str(path)))
    assert uploaded["status"] == "processed" and uploaded["n_examples"] == 12
    return str(uploaded["id"])


def test_upload_create_watch_and_use_the_model(stack: Stack, training_file: str, tmp_path: Path) -> None:
    listed = adaptery(stack, "files", "list")
    assert listed.returncode == 0 and training_file in listed.stdout
    job = as_json(adaptery(stack, "--json", "jobs", "create", "-t", training_file, "--hp", "n_epochs=2",
                           "--hp", "batch_size=2", "--hp", "learning_rate=0.01", "--suffix", "cli"))
    watched = adaptery(stack, "jobs", "watch", job["id"])
    assert watched.returncode == 0, watched.stderr
    assert "succeeded: ft:" in watched.stdout
    assert "step 12/12" in watched.stderr  # the progress bar reached the last step
    model = watched.stdout.strip().rsplit(" ", 1)[-1]

    assert model in adaptery(stack, "models", "list").stdout
    assert job["id"] in adaptery(stack, "jobs", "list").stdout
    assert as_json(adaptery(stack, "--json", "jobs", "get", job["id"]))["fine_tuned_model"] == model

    adapters = as_json(adaptery(stack, "--json", "adapters", "list"))["data"]
    adapter = next(a for a in adapters if a["name"] == model)
    assert as_json(adaptery(stack, "--json", "adapters", "pin", adapter["id"]))["pinned"] is True
    assert as_json(adaptery(stack, "--json", "adapters", "unpin", adapter["id"]))["pinned"] is False
    archive = tmp_path / "adapter.zip"
    assert adaptery(stack, "adapters", "download", adapter["id"], "-o", str(archive)).returncode == 0
    assert set(zipfile.ZipFile(archive).namelist()) == {"adapter_config.json", "adapter_model.safetensors"}

    chatted = adaptery(stack, "chat", "--model", model, "--message", "Say hi 1", "--max-tokens", "4")
    assert chatted.returncode == 0, chatted.stderr

    evaluation = as_json(adaptery(stack, "--json", "eval", "create", "-f", training_file, "-m", model))
    assert evaluation["status"] == "succeeded" and [r["model"] for r in evaluation["results"]] == [model]


def test_watch_exits_non_zero_with_the_error_of_a_failed_job(stack: Stack, tmp_path: Path) -> None:
    # Every answer lies beyond max_seq_length=16 tokens: nothing to train on, so the job fails.
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "word " * 60},
                                                       {"role": "assistant", "content": "yes"}]})
                              for _ in range(4)) + "\n")
    file_id = as_json(adaptery(stack, "--json", "files", "upload", str(path)))["id"]
    job = as_json(adaptery(stack, "--json", "jobs", "create", "-t", file_id, "--hp", "max_seq_length=16"))
    watched = adaptery(stack, "jobs", "watch", job["id"])
    assert watched.returncode == 1
    line = one_line_error(watched, after_progress=True)
    assert "failed" in line and "max_seq_length=16" in line


def test_watch_exits_2_when_the_job_is_cancelled(stack: Stack, training_file: str, client: httpx.Client) -> None:
    job = as_json(adaptery(stack, "--json", "jobs", "create", "-t", training_file, "--hp", "n_epochs=40",
                           "--hp", "batch_size=1"))
    environment = {**stack.env, "ADAPTERY_API_URL": stack.base_url, "ADAPTERY_API_KEY": TEST_KEY}
    watcher = subprocess.Popen([sys.executable, "-m", "app.cli", "jobs", "watch", job["id"]], cwd=ROOT,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_status(client, job["id"], {"running"})
    time.sleep(1)
    assert as_json(adaptery(stack, "--json", "jobs", "cancel", job["id"]))["id"] == job["id"]
    _, stderr = watcher.communicate(timeout=budget(60))
    assert watcher.returncode == 2, stderr
    assert "cancelled" in stderr


def test_errors_are_one_readable_line(stack: Stack, training_file: str) -> None:
    missing = adaptery(stack, "jobs", "get", "ftjob-nope")
    assert "404" in one_line_error(missing)
    bad = adaptery(stack, "jobs", "create", "-t", training_file, "--method", "lora", "--hp", "r=0")
    assert "field: method.lora.hyperparameters.r" in one_line_error(bad)
    no_key = adaptery(stack, "files", "list", ADAPTERY_API_KEY="")
    assert "401" in one_line_error(no_key)
    unreachable = adaptery(stack, "models", "list", ADAPTERY_API_URL=f"http://127.0.0.1:{free_port()}")
    assert "cannot reach the API" in one_line_error(unreachable)
    malformed = adaptery(stack, "jobs", "create", "-t", training_file, "--hp", "novalue")
    assert "key=value" in one_line_error(malformed)
