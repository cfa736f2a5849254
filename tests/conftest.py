"""Test fixtures that start the real things: Redis, PostgreSQL, an API server over HTTP, Celery workers.

Models: the default SmolLM2-135M is converted once into .cache/models (shared by every run in this
checkout); most tests use a tiny randomly initialised Llama with SmolLM2's real tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.tiny_model import TINY_MODEL_ID, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = ROOT / ".cache" / "models"
# The keys every test stack starts with (ADAPTERY_BOOTSTRAP_KEY / ADAPTERY_ADMIN_KEY).
TEST_KEY = "sk-ady-test-local-tenant-key"
ADMIN_KEY = "sk-ady-test-admin-key"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
REDIS_URL = os.environ.get("ADAPTERY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_ADMIN_URL = os.environ.get("ADAPTERY_TEST_POSTGRES_URL", "postgresql+psycopg://127.0.0.1:5432/test")

os.environ["ADAPTERY_MODEL_CACHE_DIR"] = str(MODEL_CACHE)


# ------------------------------------------------------------------ models


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the packaged GGUF (about 20 s the first time, then cached)."""
    from adapters import base_models
    from app.settings import DEFAULT_BASE_MODEL, Settings

    settings = Settings()
    return Path(base_models.local_path(settings, base_models.resolve(settings, DEFAULT_BASE_MODEL)))


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: Path) -> Path:
    return build_tiny_model(MODEL_CACHE / TINY_MODEL_ID, str(default_model_dir))


# ------------------------------------------------------------------ services


def _redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _redis_available():
        pytest.fail(f"Redis is not reachable at {REDIS_URL}; start redis-server (the CI script does)")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    import sqlalchemy as sa

    name = f"adaptery_test_{secrets.token_hex(4)}"
    try:
        admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except Exception as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """A running API server (real HTTP) and its Celery workers, sharing one data dir and database."""

    base_url: str
    env: dict[str, str]
    data_dir: Path
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout, headers=AUTH)

    def start_worker(self, name: str = "worker", env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
                   "--loglevel=INFO", "--pool=prefork", "--concurrency=1", "-Q", "training",
                   "-n", f"{name}-{secrets.token_hex(3)}@%h"]
        return self._spawn(name, command, env)

    def start_api(self) -> subprocess.Popen[bytes]:
        port = self.base_url.rsplit(":", 1)[1]
        return self._spawn("api", [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                                   "--port", port, "--log-level", "warning"])

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (kept open for the process's life)
        process = subprocess.Popen(command, cwd=ROOT, env={**self.env, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        """kill -9 a process and everything in its process group (a Celery worker and its pool)."""
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        try:
            # Signal the main process only: Celery's pool children must be stopped by their parent.
            process.send_signal(sig)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its process group
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")
            try:
                last = httpx.get(f"{self.base_url}/ready", timeout=5)
                if last.status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"stack not ready after {timeout}s: {getattr(last, 'text', last)}")

    def wait_ready_http(self, timeout: float = 60.0) -> None:
        """The API answers (no worker needed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"API not up after {timeout}s:\n{self.log_tail('api')}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def stack_env(data_dir: Path, *, database_url: str, broker_url: str, tiny_model_dir: Path, port: int,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERY_")}
    env.update({
        "ADAPTERY_DATA_DIR": str(data_dir),
        "ADAPTERY_DATABASE_URL": database_url,
        "ADAPTERY_BROKER_URL": broker_url,
        "ADAPTERY_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "ADAPTERY_BASE_MODELS": json.dumps({TINY_MODEL_ID: str(tiny_model_dir)}),
        "ADAPTERY_DEFAULT_BASE_MODEL": TINY_MODEL_ID,
        "ADAPTERY_PORT": str(port),
        "ADAPTERY_TORCH_THREADS": "1",
        "ADAPTERY_BOOTSTRAP_KEY": TEST_KEY,
        "ADAPTERY_ADMIN_KEY": ADMIN_KEY,
        "ADAPTERY_MAX_ADAPTER_MB": "64",
        "ADAPTERY_RATE_LIMIT_PER_MINUTE": "0",  # tests poll hard; test_security turns it on
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def make_stack(tmp: Path, *, database_url: str, broker_url: str, tiny_model_dir: Path,
               extra: dict[str, str] | None = None) -> Stack:
    data_dir = tmp / "data"
    logs = tmp / "logs"
    data_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = stack_env(data_dir, database_url=database_url, broker_url=broker_url, tiny_model_dir=tiny_model_dir,
                    port=port, extra=extra)
    # Migrate before the processes start, as `adaptery serve` does, so they never race on the schema.
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    return Stack(base_url=f"http://127.0.0.1:{port}", env=env, data_dir=data_dir, logs=logs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
          postgres_url: str) -> Iterator[Stack]:
    """API + one worker on PostgreSQL and Redis (the production shape), shared by a test module."""
    tmp = tmp_path_factory.mktemp("stack")
    running = make_stack(tmp, database_url=postgres_url, broker_url=redis_url, tiny_model_dir=tiny_model_dir)
    running.start_api()
    running.start_worker()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop_all()
        if os.environ.get("ADAPTERY_KEEP_TEST_DATA") is None:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ helpers used by the e2e tests


def chat_lines(n: int, answer: str = "HELLO WORLD", start: int = 0) -> str:
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say hi {i}"},
                                              {"role": "assistant", "content": answer}]})
                     for i in range(start, start + n)) + "\n"


def upload(client: httpx.Client, content: str | bytes, filename: str = "train.jsonl") -> httpx.Response:
    data = content.encode() if isinstance(content, str) else content
    return client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (filename, data)})


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job.get("status") in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout}s: {job}")


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every event of a job, oldest first (the API pages newest first)."""
    events: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after:
            params["after"] = after
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events.extend(page["data"])
        if not page["has_more"]:
            break
        after = page["last_id"]
    return list(reversed(events))
