"""/v1/webhooks in this process: endpoints that point at forbidden targets (metadata, link-local, loopback,
this service's own host, not http) are refused, naming the url, and nothing is stored; the operator's allow-list
(ADAPTERY_WEBHOOK_ALLOWED_HOSTS, set for this module's app) lets one such host through and no other. Deliveries
need a worker and a receiver: tests/e2e/test_webhooks.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.services.webhooks import forbidden_reason
from app.settings import Settings
from tests.api.conftest import Api, error_of, in_process_api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    """The module's app, allowing webhooks to 127.0.0.1 (as the end-to-end stack's receiver needs)."""
    with in_process_api(tmp_path_factory.mktemp("webhooks"), tiny_model_dir,
                        extra={"ADAPTERY_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]'}) as running:
        yield running


def endpoint_ids(client: TestClient) -> list[str]:
    return [e["id"] for e in client.get("/v1/webhooks").json()["data"]]


@pytest.mark.parametrize(("url", "why"), [
    ("http://169.254.169.254/latest/meta-data", "metadata"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://localhost:9/hook", "own host"),
    ("http://[::1]:9/hook", "loopback"),
    ("ftp://example.com/hook", "http or https"),
    ("http://0.0.0.0:9/hook", "unspecified"),
])
def test_forbidden_targets_are_refused(client: TestClient, url: str, why: str) -> None:
    before = endpoint_ids(client)
    response = client.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "url" and why in error["message"], error
    assert endpoint_ids(client) == before


def test_the_operator_allow_list_and_the_own_host(client: TestClient) -> None:
    # (Settings would read this module's allow-list from the environment: each one here names its own.)
    settings = Settings(host="api.internal.example", webhook_allowed_hosts=[])
    assert "own host" in (forbidden_reason("http://api.internal.example/hook", settings) or "")
    assert forbidden_reason("http://127.0.0.1:9/hook", Settings(webhook_allowed_hosts=["127.0.0.1"])) is None
    no_list = Settings(webhook_allowed_hosts=[])
    assert no_list.host == "127.0.0.1"  # ADAPTERY_HOST's default
    assert "own host" in (forbidden_reason("http://127.0.0.1:9/hook", no_list) or "")
    assert "loopback" in (forbidden_reason("http://127.0.0.2:9/hook", no_list) or "")

    # Through the API of an app whose allow-list names 127.0.0.1: that host is accepted, its neighbours are not.
    allowed = client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
    assert allowed.status_code == 200, allowed.text
    endpoint = allowed.json()
    assert endpoint["url"] == "http://127.0.0.1:9/hook" and endpoint["secret"].startswith("whsec_")
    assert endpoint["id"] in endpoint_ids(client)
    for url, why in (("http://127.0.0.2:9/hook", "loopback"), ("http://localhost:9/hook", "own host")):
        refused = client.post("/v1/webhooks", json={"url": url})
        assert refused.status_code == 400 and why in error_of(refused)["message"], refused.text
    assert client.delete(f"/v1/webhooks/{endpoint['id']}").json()["deleted"] is True
    assert endpoint["id"] not in endpoint_ids(client)
