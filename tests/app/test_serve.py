"""`adaptery serve` in role all: the engine's process is named and keyed by the process in front of it, and the
log and the metrics show each request once (what the API forwards to its engine, and the engine's polls, at DEBUG
and uncounted there). The processes themselves: tests/e2e/test_embedded.py."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response

from app import logs, metrics
from app.cli import engine_apart
from app.settings import Settings, get_settings


def test_the_engine_runs_as_role_inference_on_loopback_behind_this_process_as_role_api() -> None:
    engine, api_env = engine_apart(Settings(internal_key=""))
    assert engine.command[:2] == [sys.executable, "-m"] and engine.command[2:6] == ["app.cli", "serve", "--role",
                                                                                     "inference"]
    port = engine.env["ADAPTERY_PORT"]
    assert engine.env["ADAPTERY_HOST"] == "127.0.0.1" and engine.env["ADAPTERY_ROLE"] == "inference"
    assert api_env == {"ADAPTERY_ROLE": "api", "ADAPTERY_INFERENCE_URLS": f"http://127.0.0.1:{port}",
                       "ADAPTERY_INTERNAL_KEY": engine.env["ADAPTERY_INTERNAL_KEY"]}
    assert len(api_env["ADAPTERY_INTERNAL_KEY"]) >= 32
    other, other_env = engine_apart(Settings(internal_key=""))
    assert other_env["ADAPTERY_INTERNAL_KEY"] != api_env["ADAPTERY_INTERNAL_KEY"]  # a fresh secret per start
    kept, kept_env = engine_apart(Settings(internal_key="the-operators-own-key"))
    assert kept.env["ADAPTERY_INTERNAL_KEY"] == kept_env["ADAPTERY_INTERNAL_KEY"] == "the-operators-own-key"


def _request(path: str, headers: dict[str, str]) -> Request:
    route = type("Route", (), {"path": path})()
    return Request({"type": "http", "method": "GET", "path": path, "query_string": b"", "route": route,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})


KEY = "the-internal-key-of-this-deployment"
FORWARDED = {"x-adaptery-internal-key": KEY}


@pytest.mark.parametrize(("role", "path", "headers", "status", "quiet"), [
    ("inference", "/internal/state", {"authorization": f"Bearer {KEY}"}, 200, True),  # the router's poll
    ("inference", "/internal/state", {}, 401, False),  # a refused poll shows
    ("inference", "/v1/chat/completions", FORWARDED, 200, True),  # the API logs and counts it
    ("inference", "/v1/chat/completions", {"x-adaptery-internal-key": "a-guess"}, 200, False),
    ("inference", "/v1/chat/completions", {}, 200, False),  # a client of the replica itself
    ("all", "/v1/chat/completions", FORWARDED, 200, False),  # no client keeps itself out of the log elsewhere
    ("api", "/v1/models", FORWARDED, 200, False),
])
def test_what_the_api_forwarded_is_logged_at_debug_and_not_counted_twice(
        role: str, path: str, headers: dict[str, str], status: int, quiet: bool, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERY_ROLE", role)
    monkeypatch.setenv("ADAPTERY_INTERNAL_KEY", KEY)
    get_settings.cache_clear()
    monkeypatch.setattr(metrics.HTTP_REQUESTS, "labels", lambda *labels: counted.append(labels) or Counted())
    counted: list[tuple[str, ...]] = []

    async def answer(_: Request) -> Response:
        return Response(status_code=status)

    try:
        with caplog.at_level(logging.DEBUG, logger="adaptery.http"):
            asyncio.run(logs.record_request(_request(path, headers), answer))
            asyncio.run(metrics.record_http(_request(path, headers), answer))
    finally:
        get_settings.cache_clear()
    [record] = [r for r in caplog.records if r.name == "adaptery.http"]
    assert record.getMessage() == f"GET {path} {status}"
    assert record.levelno == (logging.DEBUG if quiet else logging.INFO)
    assert counted == ([] if quiet else [(path, "GET", str(status))])


class Counted:
    def inc(self) -> None:
        pass


def test_a_request_id_is_kept_only_if_printable_ascii() -> None:
    seen: list[str | None] = []

    async def answer(_: Request) -> Response:
        seen.append(logs.request_id.get())
        return Response()

    for given, kept in [("req-from-the-client", True), ("req-caf\u00e9", False), ("a\tb", False), ("x" * 129, False)]:
        request = Request({"type": "http", "method": "GET", "path": "/", "query_string": b"",
                           "headers": [(b"x-request-id", given.encode("latin-1"))]})
        response = asyncio.run(logs.record_request(request, answer))
        assert (seen[-1] == given) is kept and response.headers["x-request-id"] == seen[-1]
        assert seen[-1] is not None and seen[-1].isascii()


def test_a_child_that_keeps_dying_young_is_restarted_less_and_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that cannot start (a setting it refuses, no memory for its model) is not restarted every couple of
    seconds for ever: each young death doubles the pause, up to a cap."""
    from app import cli

    monkeypatch.setattr(cli, "RESTART_PAUSE_S", 0.05)
    monkeypatch.setattr(cli, "RESTART_PAUSE_MAX_S", 0.4)
    spawned: list[float] = []
    supervisor = cli.Supervisor("engine", [sys.executable, "-c", "raise SystemExit(3)"])
    real_spawn = supervisor._spawn

    def spawn() -> Any:
        spawned.append(time.monotonic())
        return real_spawn()

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    supervisor.start()
    time.sleep(2.5)
    supervisor.stop()
    gaps = [b - a for a, b in zip(spawned, spawned[1:], strict=False)]
    # Without the back-off: a restart every 0.05 s plus the child's start-up, some 20. With it: 0.1, 0.2, 0.4, 0.4...
    assert 3 <= len(spawned) <= 9, gaps
    assert gaps[-1] >= 0.35 and gaps[-1] > 2 * gaps[0], gaps
