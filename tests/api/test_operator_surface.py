"""What the service shows of itself and of its operator's secrets (issue 21's smaller findings): documentation
pages that run no script from elsewhere, no key in the log, weak operator secrets refused, /metrics behind an
optional token with no tenant's ids, /ready's error text for the operator only, one log line per message, seeds
in torch's range, streams that end when their key is revoked, and training curves of bounded size."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tests.api.conftest import Api, chat_file, error_of, in_process_api, open_event_stream
from tests.conftest import ADMIN_KEY
from tests.tiny_model import TINY_MODEL_ID

METRICS_TOKEN = "scrape-token-0123456789abcdef"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    # A broker nobody listens at, so /ready has an error to report (connecting is refused at once).
    extra = {"ADAPTERY_METRICS_TOKEN": METRICS_TOKEN, "ADAPTERY_BROKER_URL": "redis://127.0.0.1:9/0"}
    with in_process_api(tmp_path_factory.mktemp("surface"), tiny_model_dir, extra) as running:
        yield running


def test_documentation_pages_load_nothing_from_another_origin(api: Api) -> None:
    for page in ("/docs", "/redoc"):
        answer = api.as_key(None).get(page)
        assert answer.status_code == 200, page
        sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", answer.text)
        assert sources and all(s.startswith("/") and not s.startswith("//") for s in sources), (page, sources)
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        for source in sources:
            assert api.as_key(None).get(source).status_code == 200, source


def test_the_bootstrap_key_is_not_written_to_the_log(tmp_path: Path, tiny_model_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with in_process_api(tmp_path, tiny_model_dir, {"ADAPTERY_BOOTSTRAP_KEY": ""}) as fresh:
        key = (fresh.data_dir / "bootstrap_key").read_text().strip()
        assert fresh.as_key(key).get("/v1/models").status_code == 200
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "bootstrap_key" in logged  # where to find it is said
    assert key not in logged


@pytest.mark.parametrize("secret", ["change-me-internal", "short", "aaaaaaaaaaaaaaaaaaaaaaaa", "sk-admin-secret-1"])
def test_weak_operator_secrets_are_refused(secret: str) -> None:
    from app.settings import Settings

    for field in ("admin_key", "internal_key", "bootstrap_key", "metrics_token"):
        with pytest.raises(ValidationError) as refused:
            Settings(**{field: secret})
        assert f"ADAPTERY_{field.upper()}" in str(refused.value) and secret not in str(refused.value)
    assert Settings(admin_key="Zq8-t1Kx_3mVb7Rw2Lp9").admin_key  # a random one is fine; empty is "off"
    assert Settings(admin_key="").admin_key == ""


def test_metrics_need_the_token_and_name_no_adapter(api: Api) -> None:
    anyone = api.as_key(None)
    refused = anyone.get("/metrics")
    assert refused.status_code == 401 and "ADAPTERY_METRICS_TOKEN" in error_of(refused)["message"]
    tenant = api.client.get("/metrics")  # a tenant's key is not the scrape token
    assert tenant.status_code == 401
    for secret in (METRICS_TOKEN, ADMIN_KEY):
        scraped = api.as_key(secret).get("/metrics")
        assert scraped.status_code == 200 and "adaptery_http_requests" in scraped.text
    # After a request on the base model, the in-flight gauges are totals per base model: no adapter label.
    api.client.post("/v1/completions", json={"model": TINY_MODEL_ID, "prompt": "Hi", "max_tokens": 1})
    text = api.as_key(METRICS_TOKEN).get("/metrics").text
    assert "adaptery_adapter_requests_in_flight" in text and 'adapter="' not in text


def test_ready_shows_error_text_to_the_operator_only(api: Api) -> None:
    anyone = api.as_key(None).get("/ready")
    assert anyone.status_code == 503
    broker = anyone.json()["checks"]["broker"]
    assert not broker["ok"] and "127.0.0.1" not in anyone.text and "service log" in broker["error"]
    operator = api.as_key(METRICS_TOKEN).get("/ready").json()["checks"]["broker"]
    assert not operator["ok"] and "service log" not in operator["error"]


def test_text_logs_keep_one_line_per_message() -> None:
    from app.logs import TextFormatter

    record = logging.LogRecord("adaptery", logging.INFO, __file__, 1, "file %s", ("x\nFAKE 200\x1b[2J",), None)
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line and "\\n" in line and "\\x1b" in line


def test_seeds_outside_torchs_range_are_a_400(client: TestClient) -> None:
    asked = {"model": TINY_MODEL_ID, "prompt": "Hi", "max_tokens": 1}
    too_big = client.post("/v1/completions", json={**asked, "seed": 2**64})
    assert too_big.status_code == 400 and error_of(too_big)["param"] == "seed", too_big.text
    assert client.post("/v1/completions", json={**asked, "seed": 2**64 - 1}).status_code == 200
    assert client.post("/v1/completions", json={**asked, "seed": -(2**63)}).status_code == 200


@pytest.mark.timeout(120)
def test_an_open_stream_ends_when_its_key_is_revoked(api: Api) -> None:
    admin = api.as_key(ADMIN_KEY)
    tenant = admin.post("/v1/admin/tenants", json={"name": "revoked-while-streaming"}).json()
    second = admin.post(f"/v1/admin/tenants/{tenant['id']}/keys").json()
    key_id, key = second["id"], second["api_key"]
    as_tenant = api.as_key(key)
    job = as_tenant.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(as_tenant)})
    assert job.status_code == 200, job.text
    path = f"/v1/fine_tuning/jobs/{job.json()['id']}/events"
    app = api.client.app

    async def stream_until_it_ends() -> bytes:
        received = b""
        first_event = asyncio.Event()

        def on_message(message: dict[str, Any]) -> None:
            nonlocal received
            if message["type"] == "http.response.body":
                received += message.get("body", b"")
                if b"data:" in received:
                    first_event.set()

        streaming = open_event_stream(app, path, key, closing=asyncio.Event(), on_message=on_message)
        await asyncio.wait_for(first_event.wait(), timeout=30)
        revoked = await asyncio.to_thread(admin.delete, f"/v1/admin/keys/{key_id}")
        assert revoked.status_code == 200, revoked.text
        await asyncio.wait_for(streaming, timeout=30)  # the stream ends by itself: the job never finishes here
        return received

    received = asyncio.run(stream_until_it_ends())
    assert b"event: error" in received
    error = json.loads(received.split(b"event: error", 1)[1].split(b"data:", 1)[1].split(b"\n", 1)[0])
    assert error["error"]["code"] == "invalid_api_key"


def test_training_curves_are_thinned_to_max_points(client: TestClient) -> None:
    from app.services.job_metrics import downsampled

    points = [{"step": i} for i in range(1, 10_001)]
    kept, stride = downsampled(points, 1000)
    assert len(kept) <= 1000 and stride == 11 and kept[0]["step"] == 1 and kept[-1]["step"] == 10_000
    assert downsampled(points[:5], 1000) == (points[:5], 1)
    job = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client)})
    series = client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}/metrics", params={"max_points": 10})
    assert series.status_code == 200 and series.json()["stride"] == 1
    refused = client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}/metrics", params={"max_points": 10**6})
    assert refused.status_code == 400 and error_of(refused)["param"] == "max_points"
