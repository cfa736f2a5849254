"""/v1/webhooks in this process: endpoints that point at forbidden targets (metadata, link-local, loopback,
this service's own host, not http, IPv4 addresses hidden in IPv6 ones) are refused, naming the url, and nothing is
stored; the operator's allow-list (ADAPTERY_WEBHOOK_ALLOWED_HOSTS, set for this module's app) lets one such host
through and no other; a tenant has at most ADAPTERY_WEBHOOK_MAX_ENDPOINTS_PER_TENANT endpoints. A delivery
connects to the very address its check resolved (DNS is played here by patching socket.getaddrinfo, and the
connection by a socket pair: this tier listens on no port), and a round of deliveries is claimed fairly across
tenants. Deliveries to real receivers (slow, drip-fed, huge replies): tests/e2e/test_webhooks.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.db.models import WebhookDelivery, WebhookEndpoint
from app.db.session import make_engine
from app.services import webhooks
from app.services.webhooks import forbidden_reason
from app.settings import Settings, get_settings
from tests.api.conftest import Api, error_of, in_process_api
from tests.budgets import UNLESS_BROKEN

MAX_ENDPOINTS = 3


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    """The module's app, allowing webhooks to 127.0.0.1 (as the end-to-end stack's receiver needs)."""
    with in_process_api(tmp_path_factory.mktemp("webhooks"), tiny_model_dir,
                        extra={"ADAPTERY_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
                               "ADAPTERY_WEBHOOK_MAX_ENDPOINTS_PER_TENANT": str(MAX_ENDPOINTS)}) as running:
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
    # IPv4 addresses inside IPv6 ones reach the IPv4 address: mapped, compatible, 6to4, NAT64, Teredo.
    ("http://[::ffff:127.0.0.1]:9/hook", "loopback"),
    ("http://[::ffff:169.254.169.254]/latest", "metadata"),
    ("http://[::127.0.0.1]:9/hook", "loopback"),
    ("http://[2002:7f00:1::1]:9/hook", "loopback"),
    ("http://[64:ff9b::a9fe:a9fe]/latest", "metadata"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:9/hook", "loopback"),  # Teredo: client 127.0.0.1 (inverted)
    # Metadata services outside link-local: Alibaba Cloud, Azure's WireServer, Oracle Cloud; AWS over IPv6.
    ("http://100.100.100.200/latest/meta-data", "metadata"),
    ("http://168.63.129.16/machine", "metadata"),
    ("http://192.0.0.192/latest", "metadata"),
    ("http://[fd00:ec2::254]/latest", "metadata"),
    ("http://example.com:99999/hook", "port"),
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


# ---------------------------------------------------------------- a delivery connects where its check looked


class RebindingDns:
    """A name server that answers `name` with the addresses queued in `answers`, then with 127.0.0.1: a rebinding
    attacker who shows the check a public address and the connection loopback. Other names resolve as usual."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.answers: list[str] = []
        self.questions = 0
        real = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host != name:
                return real(host, port, *args, **kwargs)
            self.questions += 1
            address = self.answers.pop(0) if self.answers else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 0)))]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


class PairEnd(socket.socket):
    """One end of a socket pair, posing as a TCP connection: TCP options (httpcore sets TCP_NODELAY) are no-ops."""

    def setsockopt(self, level: int, *args: Any) -> None:  # type: ignore[override]
        if level != socket.IPPROTO_TCP:
            super().setsockopt(level, *args)


class Connections:
    """Stands in for socket.create_connection: records where each connection was asked to go and answers it
    with 204 from the other end of a socket pair (this tier opens no listening socket)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.targets: list[tuple[str, int]] = []
        self.requests: list[bytes] = []
        monkeypatch.setattr(socket, "create_connection", self.connect)

    def connect(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        self.targets.append((address[0], address[1]))
        ours, theirs = socket.socketpair()
        threading.Thread(target=self._answer, args=(theirs,), daemon=True).start()
        return PairEnd(ours.family, ours.type, fileno=ours.detach())

    def _answer(self, sock: socket.socket) -> None:
        with sock:
            sock.settimeout(UNLESS_BROKEN)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests.append(data)
            sock.sendall(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")


def wait_for_attempt(session: Session, delivery_id: str) -> WebhookDelivery:
    """The delivery once its attempt is recorded (the worker's delivery threads may still be sending it)."""
    deadline = time.monotonic() + UNLESS_BROKEN
    while time.monotonic() < deadline:
        session.expire_all()
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        if row.status != "pending" or row.last_error is not None:
            return row
        time.sleep(0.02)
    raise AssertionError(f"delivery {delivery_id} was never attempted")


def test_a_delivery_connects_to_the_address_its_check_resolved(api: Api, client: TestClient,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dns = RebindingDns(monkeypatch, "rebind.example")
    connections = Connections(monkeypatch)
    dns.answers = ["203.0.113.7"]
    created = client.post("/v1/webhooks", json={"url": "http://rebind.example/hook"})
    assert created.status_code == 200, created.text
    endpoint_id = created.json()["id"]
    with Session(make_engine(api.database_url)) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        session.add(WebhookDelivery(id="evt_rebind", endpoint_id=endpoint_id, tenant_id=endpoint.tenant_id,
                                    event_type="fine_tuning.job.succeeded", payload='{"id":"evt_rebind"}',
                                    status="pending", attempts=0, next_attempt_at=time.time()))
        session.commit()
        # The attempt's check sees the public address; any later question about the name would get loopback.
        dns.answers, dns.questions = ["203.0.113.7"], 0
        webhooks.deliver_due(session, get_settings(), owner="test-worker")
        row = wait_for_attempt(session, "evt_rebind")
    assert connections.targets == [("203.0.113.7", 80)], "connected by name: a second resolution could rebind"
    assert dns.questions == 1, "one resolution per attempt"
    assert row.status == "delivered" and row.last_status_code == 204, (row.status, row.last_error)
    assert b"\r\nhost: rebind.example\r\n" in connections.requests[0].lower(), "the name travels as the Host header"
    assert client.delete(f"/v1/webhooks/{endpoint_id}").status_code == 200


# ---------------------------------------------------------------- per-tenant limits and fairness


def test_a_tenant_has_at_most_the_endpoint_limit(api: Api, client: TestClient) -> None:
    for leftover in endpoint_ids(client):  # (a test that failed may have left one)
        client.delete(f"/v1/webhooks/{leftover}")
    made = [client.post("/v1/webhooks", json={"url": f"http://10.0.0.{i}:9/hook"}).json()["id"]
            for i in range(1, MAX_ENDPOINTS + 1)]
    refused = client.post("/v1/webhooks", json={"url": "http://10.0.0.99:9/hook"})
    assert refused.status_code == 429, refused.text
    error = error_of(refused)
    assert error["code"] == "too_many_webhooks" and f"at most {MAX_ENDPOINTS}" in error["message"], error
    assert "ADAPTERY_WEBHOOK_MAX_ENDPOINTS_PER_TENANT" in error["message"], error
    assert sorted(endpoint_ids(client)) == sorted(made)
    # Another tenant's endpoints are counted apart.
    from tests.conftest import ADMIN_KEY
    other_key = api.as_key(ADMIN_KEY).post("/v1/admin/tenants", json={"name": "webhook-limit"}).json()["api_key"]
    assert api.as_key(other_key).post("/v1/webhooks", json={"url": "http://10.0.1.1:9/hook"}).status_code == 200
    # Deleting one makes room again.
    assert client.delete(f"/v1/webhooks/{made[0]}").status_code == 200
    again = client.post("/v1/webhooks", json={"url": "http://10.0.0.99:9/hook"})
    assert again.status_code == 200, again.text
    for endpoint_id in [*made[1:], again.json()["id"]]:
        assert client.delete(f"/v1/webhooks/{endpoint_id}").status_code == 200


def test_a_round_claims_fairly_across_tenants_and_caps_each(api: Api) -> None:
    """Tenant a has six due deliveries older than anyone's, b two, c one. Each round takes one per tenant in
    turn, and no tenant ever has more than ADAPTERY_WEBHOOK_IN_FLIGHT_PER_TENANT in flight."""
    settings = Settings(webhook_in_flight_per_tenant=2)
    moment = time.time()
    due = {"a": 6, "b": 2, "c": 1}
    with Session(make_engine(api.database_url)) as session:
        for tenant, count in due.items():
            session.add(WebhookEndpoint(id=f"we_fair_{tenant}", tenant_id=f"fair-{tenant}", url="http://10.0.0.1/",
                                        secret="whsec_x", events=[], created_at=0))
            session.flush()
            session.add_all(WebhookDelivery(id=f"evt_fair_{tenant}{i}", endpoint_id=f"we_fair_{tenant}",
                                            tenant_id=f"fair-{tenant}", event_type="fine_tuning.job.succeeded",
                                            payload="{}", status="pending", attempts=0,
                                            next_attempt_at=moment - 100 + i + (50 if tenant != "a" else 0))
                            for i in range(count))
        session.commit()
        try:
            def tenants(claimed: list[str]) -> list[str]:
                return sorted(delivery_id.removeprefix("evt_fair_")[0] for delivery_id in claimed)

            assert tenants(webhooks.claim_due(session, settings, owner="w1", free=3)) == ["a", "b", "c"]
            assert tenants(webhooks.claim_due(session, settings, owner="w2", free=5)) == ["a", "b"]
            assert webhooks.claim_due(session, settings, owner="w3", free=5) == []  # a has two in flight
        finally:
            session.query(WebhookDelivery).filter(WebhookDelivery.id.like("evt_fair_%")).delete()
            session.query(WebhookEndpoint).filter(WebhookEndpoint.id.like("we_fair_%")).delete()
            session.commit()
