"""The one part of the security tests that crosses processes: the rate limit is counted in Redis when Redis is the
broker, so API replicas behind a load balancer share each key's count (app/services/rate_limit.py). Everything
else of keys, admin routes, the BOLA matrix, public adapters, limits and quotas runs against the app in process:
tests/api/test_security.py and tests/api/test_limits.py (where the count is this process's own)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.budgets import HTTP_REQUEST, budget
from tests.conftest import AUTH, Stack, make_stack
from tests.services import free_port

RATE_LIMIT_PER_MINUTE = 12


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
                 database_url: str) -> Iterator[tuple[str, str]]:
    """Two API processes on one database and one Redis, with a rate limit of 12 requests a minute per key."""
    stack = make_stack(tmp_path_factory.mktemp("rate-limited-replicas"), database_url=database_url,
                       broker_url=redis_url, tiny_model_dir=tiny_model_dir,
                       extra={"ADAPTERY_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT_PER_MINUTE)})
    stack.start_api()
    port = free_port()
    stack._spawn("api-2", [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port",
                           str(port), "--log-level", "warning"], env={"ADAPTERY_PORT": str(port)})
    try:
        stack.wait_ready_http()
        second = Stack(base_url=f"http://127.0.0.1:{port}", env=stack.env, data_dir=stack.data_dir, logs=stack.logs)
        second.processes = {"api": stack.processes["api-2"]}
        second.wait_ready_http()
        yield stack.base_url, second.base_url
    finally:
        stack.stop_all()


def test_the_rate_limit_is_counted_in_redis_across_replicas(two_replicas: tuple[str, str]) -> None:
    # 16 requests with one key, alternating between the replicas: 8 each, under the limit of either alone.
    within_one_window()
    clients = [httpx.Client(base_url=url, headers=AUTH, timeout=budget(HTTP_REQUEST)) for url in two_replicas]
    try:
        responses = [clients[i % 2].get("/v1/files") for i in range(RATE_LIMIT_PER_MINUTE + 4)]
    finally:
        for client in clients:
            client.close()
    statuses = [r.status_code for r in responses]
    # A fixed one-minute window, which the burst does not straddle: 12 pass, the rest are refused.
    assert statuses == [200] * RATE_LIMIT_PER_MINUTE + [429] * 4, statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 60


def within_one_window(seconds: float = 5) -> None:
    """Wait, if need be, until the rate limit's one-minute window has `seconds` left at least: a burst sent now
    is counted in one window."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.1)
