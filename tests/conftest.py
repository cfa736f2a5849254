"""Test fixtures that start the real things: Redis, PostgreSQL, an API server over HTTP, Celery workers.

Redis and PostgreSQL are throwaway servers of the suite's own (tests/services.py) unless
ADAPTERY_TEST_REDIS_URL / ADAPTERY_TEST_POSTGRES_URL name servers to use.

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
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import budgets, services
from tests.shared_models import MODEL_CACHE, ROOT, default_model, tiny_model, use_the_cache
from tests.tiny_model import TINY_MODEL_ID

# The keys every test stack starts with (ADAPTERY_BOOTSTRAP_KEY / ADAPTERY_ADMIN_KEY).
TEST_KEY = "sk-ady-test-local-tenant-key"
ADMIN_KEY = "sk-ady-test-admin-key"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
# Servers the suite may use; unset (the default), it starts throwaway ones of its own (tests/services.py).
REDIS_URL = os.environ.get("ADAPTERY_TEST_REDIS_URL") or None
POSTGRES_URL = os.environ.get("ADAPTERY_TEST_POSTGRES_URL") or None
# The database the end-to-end stacks run on: "postgresql" (default) or "sqlite".
TEST_DATABASE = os.environ.get("ADAPTERY_TEST_DATABASE", "postgresql")
if TEST_DATABASE not in ("postgresql", "sqlite"):
    raise RuntimeError(f"ADAPTERY_TEST_DATABASE must be postgresql or sqlite, not {TEST_DATABASE!r}")

use_the_cache()


# ------------------------------------------------------------------ models


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the packaged GGUF (about 20 s the first time, then cached)."""
    return default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: Path) -> Path:
    return tiny_model(default_model_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny model's tokenizer (SmolLM2's), loaded once; treat it as read-only, every test shares it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------ in-process state

def reset_process_state() -> None:
    """Forget every per-process cache built from settings (settings, database engine, serving engine), so the next
    use builds them from the environment as it is now."""
    from app.db import session as db_session
    from app.services import base_models, inference, tenants, tokenizers
    from app.settings import get_settings

    engine = inference.engine_if_started()
    if engine is not None:
        for runtime in engine.runtimes().values():
            runtime.close()
    inference._engine = None
    if db_session.get_engine.cache_info().currsize:
        db_session.get_engine().dispose()
    db_session.get_engine.cache_clear()
    db_session.get_sessionmaker.cache_clear()
    get_settings.cache_clear()
    tokenizers._tokenizers.clear()
    tokenizers.warm_up = tokenizers.WarmUp()
    tenants._known_keys.clear()
    base_models.forget_registered()


# ------------------------------------------------------------------ services


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The suite's own throwaway redis-server, or the one ADAPTERY_TEST_REDIS_URL names (its database is
    flushed: name one you can spare)."""
    if REDIS_URL is None:
        with services.redis_server() as url:
            yield url
        return
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()
    except Exception as exc:
        pytest.fail(f"ADAPTERY_TEST_REDIS_URL={REDIS_URL} is not reachable: {exc}", pytrace=False)
    yield REDIS_URL


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """An admin URL of a PostgreSQL server: the suite's own throwaway one, started on first use, or the one
    ADAPTERY_TEST_POSTGRES_URL names. Fixtures make databases of their own in it and drop them."""
    if POSTGRES_URL is not None:
        yield POSTGRES_URL
        return
    with services.postgres_server() as url:
        yield url


@contextlib.contextmanager
def postgres_database(admin_url: str, *, template: str | None = None) -> Iterator[str]:
    """A fresh database (a copy of `template` when given) in the server of `admin_url`, dropped on exit."""
    import sqlalchemy as sa

    name = f"adaptery_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")))
    except Exception as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL is not reachable at {admin_url}: {exc}", pytrace=False)
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The database every stack of the session shares. PostgreSQL by default: a fresh database, dropped at the
    end, in the server `postgres_admin_url` gives. With ADAPTERY_TEST_DATABASE=sqlite (`make test-sqlite`),
    one SQLite file, as the embedded mode uses."""
    if TEST_DATABASE == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'adaptery.db'}"
        return
    with postgres_database(request.getfixturevalue("postgres_admin_url")) as url:
        yield url


# Any credentials do for the test's object store; boto3 in the test process and in the stack reads these.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "adaptery-test", "AWS_SECRET_ACCESS_KEY": "adaptery-test",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The suite's own S3-compatible server (moto's standalone server, a separate process)."""
    os.environ.update(S3_CREDENTIALS)
    with services.s3_server() as url:
        yield url


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"adaptery-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


# Whether this process measured the speed factor for the processes of a parallel run (and so prints it).
_measured_for_test_processes = False


def pytest_configure(config: pytest.Config) -> None:
    """The controlling process of a parallel run (pytest-xdist) measures the speed factor before its test
    processes start, and hands it to them (tests/budgets.py says why). `-m fast` (make check) calls no
    budget, so it measures nothing; a run without xdist measures when a test first needs a budget."""
    global _measured_for_test_processes
    processes = getattr(config.option, "numprocesses", None)
    if (isinstance(processes, int) and processes > 0 and "PYTEST_XDIST_WORKER" not in os.environ
            and config.option.markexpr != "fast" and "ADAPTERY_TEST_TIME_SCALE" not in os.environ):
        os.environ["ADAPTERY_TEST_TIME_SCALE"] = f"{budgets.factor_for_parallel_run(processes):.2f}"
        _measured_for_test_processes = True


def pytest_sessionstart(session: pytest.Session) -> None:
    """Without the server binaries the suite cannot run: say so at once, with the command that fixes it. The fast
    tier and the GPU tests (`-m fast`, `-m cuda`) start no servers and need none."""
    if session.config.option.markexpr in ("fast", "cuda"):
        return
    missing = []
    if REDIS_URL is None and shutil.which("redis-server") is None:
        missing.append("redis-server")
    if POSTGRES_URL is None:
        try:
            services.postgres_bindir()
        except services.MissingServer:
            missing.append("PostgreSQL (initdb, postgres)")
    if missing:
        pytest.exit(f"{' and '.join(missing)} not found: the tests start throwaway servers of their own. Install "
                    f"them with: {services.INSTALL_HINT}  (or point ADAPTERY_TEST_REDIS_URL / "
                    "ADAPTERY_TEST_POSTGRES_URL at servers you can spare)", returncode=4)


# ------------------------------------------------------------------ tiers

# Every test is in one tier (docs/tests.md). `e2e`: it crosses a process or needs a server (everything under
# tests/e2e and tests/soak, and tests elsewhere marked pytest.mark.e2e). `fast`: everything else, in this process
# (`make check`).
# A fast test may not start a server or listen on a port: the guard below turns either into an error naming the
# fix, so a test cannot land in the wrong tier unnoticed.
E2E_FOLDERS = (Path(__file__).parent / "e2e", Path(__file__).parent / "soak")


# With pytest-xdist (--dist loadfile --no-loadscope-reorder) modules start in collection order: the longest go
# first, so a run never ends with one process still in a long module while the others idle (from --durations).
LONGEST_FIRST = ("test_real_model.py", "test_reliability.py", "test_cli.py", "test_embedded.py",
                 "test_training_controls.py", "test_topology.py", "test_object_store.py", "test_roles.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.path.is_relative_to(folder) for folder in E2E_FOLDERS):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.fast)
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _refuse_to_listen(sock: Any, *args: Any) -> None:
    raise RuntimeError("a fast-tier test opened a listening socket: the fast tier uses no network ports. Mark the "
                       "test e2e (pytest.mark.e2e) or move it to tests/e2e.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """While a fast-tier test runs (its fixtures included), no server starts and no socket listens."""
    if item.get_closest_marker("fast") is None:
        yield
        return
    import socket

    services.servers_allowed = False
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "listen", _refuse_to_listen)
        try:
            yield
        finally:
            services.servers_allowed = True


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _measured_for_test_processes or budgets.speed_factor.cache_info().currsize:  # some test needed a budget
        terminalreporter.write_line(f"timing budgets scaled x{budgets.speed_factor():.2f} for this machine "
                                    "(tests/budgets.py)")


free_port = services.free_port


@dataclass
class Stack:
    """A running API server (real HTTP) and its Celery workers, sharing one data dir and database."""

    base_url: str
    env: dict[str, str]
    data_dir: Path
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def client(self, timeout: float = budgets.HTTP_REQUEST) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=budgets.budget(timeout), headers=AUTH)

    def start_worker(self, name: str = "worker", env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "celery", "-A", "app.queue:celery_app", "worker",
                   "--loglevel=INFO", "--pool=prefork", "--concurrency=1",
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

    def wait_ready(self, timeout: float = budgets.STACK_READY) -> None:
        timeout = budgets.budget(timeout)
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")
            try:
                # With the admin key, /ready shows why it is not (its error text is the operator's).
                last = httpx.get(f"{self.base_url}/ready", timeout=5, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                if last.status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"stack not ready after {timeout}s: {getattr(last, 'text', last)}")

    def wait_ready_http(self, timeout: float = budgets.API_UP) -> None:
        """The API answers and has warmed up (no worker needed)."""
        timeout = budgets.budget(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                checks = httpx.get(f"{self.base_url}/ready", timeout=5).json()["checks"]
                if checks["database"]["ok"] and checks["warm_up"]["ok"]:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"API not up after {timeout}s:\n{self.log_tail('api')}")

    def wait_workers_ready(self, *names: str, timeout: float = budgets.STACK_READY) -> None:
        """Each named worker has written its heartbeat (it is consuming, its pool process is up)."""
        import sqlalchemy as sa

        timeout = budgets.budget(timeout)
        engine = sa.create_engine(self.env["ADAPTERY_DATABASE_URL"])
        deadline = time.monotonic() + timeout
        try:
            while True:
                with engine.connect() as conn:
                    seen = [str(row[0]) for row in conn.execute(sa.text("SELECT hostname FROM worker_heartbeats"))]
                waiting = [n for n in names if not any(h.startswith(f"{n}-") for h in seen)]
                if not waiting:
                    return
                for name in waiting:
                    if self.processes[name].poll() is not None:
                        raise RuntimeError(f"{name} exited:\n{self.log_tail(name)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers {waiting} not ready after {timeout:.0f}s")
                time.sleep(0.3)
        finally:
            engine.dispose()

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def stack_env(data_dir: Path, *, database_url: str, broker_url: str, tiny_model_dir: Path, port: int,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERY_")}
    env.update({
        "ADAPTERY_DATA_DIR": str(data_dir),
        # As `adaptery serve` does: every process of the stack writes its metrics where the API's /metrics reads.
        "PROMETHEUS_MULTIPROC_DIR": str(data_dir / "prometheus"),
        "ADAPTERY_DATABASE_URL": database_url,
        "ADAPTERY_BROKER_URL": broker_url,
        "ADAPTERY_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "ADAPTERY_BASE_MODELS": json.dumps({TINY_MODEL_ID: str(tiny_model_dir)}),
        "ADAPTERY_DEFAULT_BASE_MODEL": TINY_MODEL_ID,
        "ADAPTERY_PORT": str(port),
        "ADAPTERY_TORCH_THREADS": "1",
        # The engine is compared with PEFT to 1e-4, which holds in float32; "auto" would serve in bf16 on a
        # CPU with AMX. Serving in bf16 on the CPU has its own tests (tests/adapters/test_model_memory.py).
        "ADAPTERY_SERVING_DTYPE": "float32",
        "ADAPTERY_BOOTSTRAP_KEY": TEST_KEY,
        "ADAPTERY_ADMIN_KEY": ADMIN_KEY,
        "ADAPTERY_MAX_ADAPTER_MB": "64",
        "ADAPTERY_RATE_LIMIT_PER_MINUTE": "0",  # tests poll hard; test_security turns it on
        "ADAPTERY_FAILED_AUTH_PER_MINUTE": "0",  # tests/api/test_request_guard.py turns it on
        # Mixed-batch tests send one tenant's requests to every model at once; the per-tenant limit (default 8)
        # has its own tests (tests/api/test_inference.py).
        "ADAPTERY_MAX_CONCURRENT_GENERATIONS_PER_TENANT": "64",
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


@contextlib.contextmanager
def running_stack(tmp: Path, *, database_url: str, broker_url: str, tiny_model_dir: Path,
                  extra: dict[str, str] | None = None) -> Iterator[Stack]:
    """API + one worker, ready; stopped and its files deleted afterwards (ADAPTERY_KEEP_TEST_DATA keeps them)."""
    running = make_stack(tmp, database_url=database_url, broker_url=broker_url, tiny_model_dir=tiny_model_dir,
                         extra=extra)
    running.start_api()
    running.start_worker()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop_all()
        if os.environ.get("ADAPTERY_KEEP_TEST_DATA") is None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def running_api(tmp: Path, *, database_url: str, broker_url: str, tiny_model_dir: Path,
                extra: dict[str, str] | None = None) -> Iterator[Stack]:
    """An API with no worker yet (the tests start and kill their own), up and warmed; stopped afterwards."""
    running = make_stack(tmp, database_url=database_url, broker_url=broker_url, tiny_model_dir=tiny_model_dir,
                         extra=extra)
    running.start_api()
    try:
        running.wait_ready_http()
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
          database_url: str) -> Iterator[Stack]:
    """API + one worker on the session's database (PostgreSQL unless ADAPTERY_TEST_DATABASE=sqlite) and Redis,
    shared by a test module."""
    with running_stack(tmp_path_factory.mktemp("stack"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client on the module's `stack` (whichever one the module uses), with the local tenant's key."""
    with stack.client() as c:
        yield c


# ------------------------------------------------------------------ helpers used by the e2e tests


def chat_lines(n: int, answer: str = "HELLO WORLD", start: int = 0) -> str:
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say hi {i}"},
                                              {"role": "assistant", "content": answer}]})
                     for i in range(start, start + n)) + "\n"


def upload(client: httpx.Client, content: str | bytes, filename: str = "train.jsonl") -> httpx.Response:
    data = content.encode() if isinstance(content, str) else content
    return client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (filename, data)})


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str],
                    timeout: float = budgets.JOB_DONE) -> dict[str, Any]:
    """Poll a job until its status is one of `statuses`; `timeout` is in reference seconds (tests/budgets.py)."""
    timeout = budgets.budget(timeout)
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
