"""The fast tier's API under test: the real app in this process (FastAPI's TestClient) on a fresh SQLite file, with
the tiny model registered as the default base model, and one test double: the broker's send (`app.queue._send`),
which records the messages the app would have sent instead of sending them. Tests assert on those messages; a
worker never runs here (the end-to-end tier, tests/e2e, runs real workers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_KEY, AUTH, TEST_KEY, reset_process_state
from tests.tiny_model import TINY_MODEL_ID


@dataclass(frozen=True)
class Message:
    """One message the app handed to the broker."""

    task: str
    object_id: str
    queue: str


@dataclass
class Broker:
    """Stands in for `app.queue._send`: keeps each message; `reachable=False` plays a broker that is down."""

    sent: list[Message] = field(default_factory=list)
    reachable: bool = True

    def __call__(self, task: str, object_id: str, queue: str) -> bool:
        if not self.reachable:
            return False
        self.sent.append(Message(task, object_id, queue))
        return True

    def take(self) -> list[Message]:
        """The messages sent since the last take()."""
        sent, self.sent = self.sent, []
        return sent


@dataclass
class Api:
    """The app of one test module and what the tests look at beside it."""

    client: TestClient  # with the local tenant's key
    data_dir: Path
    database_url: str
    broker: Broker

    def as_key(self, key: str | None, *, raise_server_exceptions: bool = True) -> TestClient:
        """Another client on the same app, with another key (None: no Authorization header). With
        raise_server_exceptions False, an unhandled error is the 500 an HTTP client would get."""
        client = TestClient(self.client.app, raise_server_exceptions=raise_server_exceptions)
        if key is not None:
            client.headers["Authorization"] = f"Bearer {key}"
        return client


@contextlib.contextmanager
def in_process_api(folder: Path, tiny_model_dir: Path, extra: dict[str, str] | None = None) -> Iterator[Api]:
    """The real app (role "all") on a fresh, migrated SQLite file in `folder`, started through its lifespan."""
    from app import queue
    from app.db.session import migrate_to_head
    from app.main import create_app

    data_dir = folder / "data"
    database_url = f"sqlite:///{folder / 'adaptery.db'}"
    env = {
        "ADAPTERY_DATA_DIR": str(data_dir),
        "ADAPTERY_DATABASE_URL": database_url,
        # Never contacted: the broker's send is the test double below.
        "ADAPTERY_BROKER_URL": f"sqla+sqlite:///{folder / 'broker.db'}",
        "ADAPTERY_BASE_MODELS": json.dumps({TINY_MODEL_ID: str(tiny_model_dir)}),
        "ADAPTERY_DEFAULT_BASE_MODEL": TINY_MODEL_ID,
        "ADAPTERY_TORCH_THREADS": "1",
        # The engine is compared with PEFT to 1e-4, which holds in float32; "auto" would serve in bf16 on a
        # CPU with AMX. Serving in bf16 on the CPU has its own tests (tests/adapters/test_model_memory.py).
        "ADAPTERY_SERVING_DTYPE": "float32",
        "ADAPTERY_BOOTSTRAP_KEY": TEST_KEY,
        "ADAPTERY_ADMIN_KEY": ADMIN_KEY,
        "ADAPTERY_MAX_ADAPTER_MB": "64",
        "ADAPTERY_RATE_LIMIT_PER_MINUTE": "0",
        "ADAPTERY_FAILED_AUTH_PER_MINUTE": "0",  # test_request_guard turns it on
        # No worker ends a job or an evaluation here, and a module's tests share the local tenant: with the
        # defaults its later jobs would be held unsent and its evaluations refused. test_quotas.py sets them low.
        "ADAPTERY_MAX_IN_FLIGHT_PER_TENANT": "1000",
        "ADAPTERY_MAX_ACTIVE_EVALUATIONS_PER_TENANT": "1000",
        # test_events opens 100 streams of one tenant to measure the pool; the per-tenant cap has its own test.
        "ADAPTERY_MAX_OPEN_STREAMS_PER_TENANT": "1000",
        **(extra or {}),
    }
    broker = Broker()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.setattr(queue, "_send", broker)
        reset_process_state()
        try:
            migrate_to_head(database_url)
            with TestClient(create_app(), headers=AUTH) as client:
                yield Api(client=client, data_dir=data_dir, database_url=database_url, broker=broker)
        finally:
            reset_process_state()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    """The module's app on its own database and data dir."""
    with in_process_api(tmp_path_factory.mktemp("api"), tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(api: Api) -> TestClient:
    return api.client


def chat_file(client: TestClient, n: int = 8, start: int = 0) -> str:
    """A processed fine-tune file of `n` chat examples; its id."""
    from tests.conftest import chat_lines

    response = client.post("/v1/files", data={"purpose": "fine-tune"},
                           files={"file": ("train.jsonl", chat_lines(n, start=start).encode())})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def error_of(response: Any) -> dict[str, Any]:
    """The OpenAI-shaped error of a response (asserting it has that shape)."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return dict(body["error"])


def asgi_scope(method: str, path: str, *, headers: list[tuple[bytes, bytes]], query: bytes = b"",
               client: str = "127.0.0.1") -> dict[str, Any]:
    """An HTTP request's ASGI scope, for tests that call the app directly (and see what it reads and sends)."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
            "headers": [(b"host", b"testserver"), *headers], "client": (client, 1), "server": ("testserver", 80)}


def open_event_stream(app: Any, path: str, key: str, *, closing: asyncio.Event,
                      on_message: Callable[[dict[str, Any]], None]) -> asyncio.Task[None]:
    """GET `path`?stream=true called straight into the app, in the running event loop (an HTTP client through
    the TestClient would wait for the end of a stream that may never end): a task that runs until the stream
    ends, or the client disconnects once `closing` is set. Each message the app sends goes to `on_message`."""
    scope = asgi_scope("GET", path, headers=[(b"authorization", f"Bearer {key}".encode())], query=b"stream=true")
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await closing.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        on_message(message)

    return asyncio.create_task(app(scope, receive, send))
