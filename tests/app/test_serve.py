"""`adaptery serve` in role all: the engine's process is named and keyed by the process in front of it, and the
log shows each request once (the replica polls at DEBUG). The processes themselves: tests/e2e/test_embedded.py."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from starlette.requests import Request
from starlette.responses import Response

from app import logs
from app.cli import engine_apart
from app.settings import Settings


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


def _request(path: str) -> Request:
    route = type("Route", (), {"path": path})()
    return Request({"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b"",
                    "route": route})


@pytest.mark.parametrize(("path", "status", "level"), [("/internal/state", 200, logging.DEBUG),
                                                        ("/internal/state", 401, logging.INFO),
                                                        ("/v1/models", 200, logging.INFO)])
def test_a_replica_poll_is_logged_at_debug_and_everything_else_at_info(
        path: str, status: int, level: int, caplog: pytest.LogCaptureFixture) -> None:
    async def answer(_: Request) -> Response:
        return Response(status_code=status)

    with caplog.at_level(logging.DEBUG, logger="adaptery.http"):
        asyncio.run(logs.record_request(_request(path), answer))
    [record] = [r for r in caplog.records if r.name == "adaptery.http"]
    assert record.levelno == level and record.getMessage() == f"GET {path} {status}"
