"""Webhooks end to end: a receiver this test runs on 127.0.0.1 gets each job outcome from the real worker,
signed per Standard Webhooks (verified with the standardwebhooks library), and retried after it answers 500.
Hostile receivers, against the delivery code in this process (an outbox on SQLite, no stack: seconds): a reply
drip-fed byte by byte ends at the attempt's deadline, a huge reply is not read, and one tenant's hanging endpoint
delays no other tenant's delivery nor takes more than its share of delivery threads; over TLS, a connection pinned
to the checked address still sends the URL's name as SNI and checks the certificate against it.
Endpoints that point at forbidden targets are refused in this process: tests/api/test_webhooks.py."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from app.db.models import WebhookDelivery, WebhookEndpoint
from app.db.session import make_engine, migrate_to_head
from app.services import webhooks
from app.settings import Settings
from tests.budgets import UNLESS_BROKEN, budget
from tests.conftest import Stack, chat_lines, running_stack, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID


class Receiver:
    """An HTTP server that records every POST and answers `failures` 500s before it answers 200."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.failures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                receiver.received.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body, "at": time.monotonic()})
                failing = receiver.failures > 0
                receiver.failures -= 1 if failing else 0
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + budget(timeout)
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.received) >= count, self.received
        return self.received


@pytest.fixture(scope="module")
def hook_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str,
               database_url: str) -> Iterator[Stack]:
    extra = {"ADAPTERY_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]', "ADAPTERY_WEBHOOK_RETRY_SECONDS": "0.5",
             "ADAPTERY_WEBHOOK_POLL_SECONDS": "0.2"}
    with running_stack(tmp_path_factory.mktemp("webhooks"), database_url=database_url, broker_url=redis_url,
                       tiny_model_dir=tiny_model_dir, extra=extra) as running:
        yield running


@pytest.fixture()
def hook_client(hook_stack: Stack) -> Iterator[httpx.Client]:
    with hook_stack.client() as client:
        yield client


def new_endpoint(client: httpx.Client, url: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": url, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def run_job(client: httpx.Client, file_id: str | None = None, **hyperparameters: Any) -> dict[str, Any]:
    file_id = file_id or upload(client, chat_lines(4)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id,
        "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 2,
                                                                **hyperparameters}}}}).json()
    return wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"})


def test_each_outcome_arrives_signed_and_a_500_is_retried(hook_client: httpx.Client) -> None:
    receiver = Receiver()
    endpoint = new_endpoint(hook_client, receiver.url)
    assert endpoint["secret"].startswith("whsec_")
    listed = hook_client.get("/v1/webhooks").json()["data"]  # (the tenant may have others from other modules)
    assert endpoint["id"] in [e["id"] for e in listed]
    assert all(e["secret"] is None for e in listed)  # shown once only

    receiver.failures = 2
    job = run_job(hook_client)
    assert job["status"] == "succeeded", job
    attempts = receiver.wait_for(3)
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1, "a retry resends the same event"
    assert attempts[1]["at"] - attempts[0]["at"] >= 0.4  # backed off
    for attempt in attempts:
        payload = Webhook(endpoint["secret"]).verify(attempt["body"], attempt["headers"])
        assert payload == json.loads(attempt["body"])
    payload = json.loads(attempts[-1]["body"])
    assert payload["type"] == "fine_tuning.job.succeeded" and payload["data"] == {"id": job["id"]}
    assert payload["id"] == attempts[-1]["headers"]["webhook-id"] and payload["object"] == "event"
    deliveries = hook_client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
    assert [(d["status"], d["attempts"], d["last_status_code"]) for d in deliveries] == [("delivered", 3, 200)]
    # A signature made with another secret does not verify.
    with pytest.raises(Exception):  # noqa: B017 (the library raises its own WebhookVerificationError)
        Webhook("whsec_" + "A" * 32).verify(attempts[-1]["body"], attempts[-1]["headers"])

    # Every answer lies beyond max_seq_length=16 tokens: nothing to train on, so the job fails.
    long_prompts = "\n".join(json.dumps({"messages": [{"role": "user", "content": "word " * 60},
                                                       {"role": "assistant", "content": "yes"}]})
                              for _ in range(4)) + "\n"
    failed = run_job(hook_client, upload(hook_client, long_prompts).json()["id"], max_seq_length=16)
    assert failed["status"] == "failed"
    later = receiver.wait_for(4)
    assert json.loads(later[3]["body"])["type"] == "fine_tuning.job.failed"
    assert json.loads(later[3]["body"])["data"] == {"id": failed["id"]}
    assert hook_client.delete(f"/v1/webhooks/{endpoint['id']}").json()["deleted"] is True


def test_a_cancelled_job_and_an_endpoint_that_only_wants_failures(hook_client: httpx.Client) -> None:
    everything, failures_only = Receiver(), Receiver()
    all_events = new_endpoint(hook_client, everything.url)
    failures_only_endpoint = new_endpoint(hook_client, failures_only.url, events=["fine_tuning.job.failed"])
    file_id = upload(hook_client, chat_lines(8)).json()["id"]
    job = hook_client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id,
        "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}}).json()
    assert hook_client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    assert wait_for_status(hook_client, job["id"], {"cancelled"})["status"] == "cancelled"
    received = everything.wait_for(1)
    assert json.loads(received[0]["body"])["type"] == "fine_tuning.job.cancelled"
    Webhook(all_events["secret"]).verify(received[0]["body"], received[0]["headers"])
    time.sleep(1.5)
    assert failures_only.received == []
    for endpoint in (all_events, failures_only_endpoint):
        assert hook_client.delete(f"/v1/webhooks/{endpoint['id']}").status_code == 200


# ---------------------------------------------------------------- hostile receivers, in this process


class Hostile:
    """An HTTP server on 127.0.0.1 whose every POST is answered by `answer(handler)` after the body is read;
    counts the requests it is answering at once."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.at_once = self.most_at_once = 0
        self.lock = threading.Lock()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers["content-length"]))
                with hostile.lock:
                    hostile.at_once += 1
                    hostile.most_at_once = max(hostile.most_at_once, hostile.at_once)
                try:
                    answer(self)
                except OSError:
                    pass  # the client hung up: what these receivers expect
                finally:
                    with hostile.lock:
                        hostile.at_once -= 1
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def outbox(tmp_path: Path) -> Iterator[Session]:
    """A migrated SQLite database of its own, for deliveries this test writes and delivers itself."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    migrate_to_head(url)
    engine = make_engine(url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


def hostile_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"webhook_allowed_hosts": ["127.0.0.1"], "webhook_retry_seconds": 60,
                              "webhook_delivery_threads": 4, "webhook_in_flight_per_tenant": 2, **overrides}
    return Settings(**values)


def add_deliveries(session: Session, tenant: str, url: str, count: int, *, age: float = 0.0) -> list[str]:
    endpoint = WebhookEndpoint(id=f"we_{tenant}", tenant_id=tenant, url=url, secret="whsec_" + "A" * 32,
                               events=list(webhooks.EVENT_TYPES), created_at=0)
    session.add(endpoint)
    session.flush()
    ids = [f"evt_{tenant}_{i}" for i in range(count)]
    session.add_all(WebhookDelivery(id=delivery_id, endpoint_id=endpoint.id, tenant_id=tenant,
                                    event_type="fine_tuning.job.succeeded", payload=json.dumps({"id": delivery_id}),
                                    status="pending", attempts=0, next_attempt_at=time.time() - age + i)
                    for i, delivery_id in enumerate(ids))
    session.commit()
    return ids


def attempted(session: Session, ids: list[str]) -> list[WebhookDelivery]:
    """The deliveries among `ids` whose latest attempt is over (recorded, no lease held)."""
    session.expire_all()
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.id.in_(ids))).all()
    return [row for row in rows if row.attempts > 0 and row.lease_owner is None]


def deliver_until(session: Session, settings: Settings, done: Callable[[], bool], timeout: float) -> float:
    """Run delivery rounds as a worker's timer does until `done()`; the seconds it took."""
    started = time.monotonic()
    while not done() and time.monotonic() - started < timeout:
        webhooks.deliver_due(session, settings, owner="e2e-worker")
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_drip_fed_reply_ends_at_the_attempt_deadline(outbox: Session) -> None:
    def drip(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nx-drip: ")
        for _ in range(40):  # a byte every 0.25 s: each read is well inside the read timeout
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.25)
        handler.wfile.write(b"\r\ncontent-length: 0\r\n\r\n")

    receiver = Hostile(drip)
    settings = hostile_settings(webhook_timeout_seconds=1.0, webhook_attempt_deadline_seconds=2.0)
    ids = add_deliveries(outbox, "drip", receiver.url, 1)
    took = deliver_until(outbox, settings, lambda: bool(attempted(outbox, ids)), budget(15))
    [row] = attempted(outbox, ids)
    assert row.status == "pending" and row.last_status_code is None, (row.status, row.last_error)
    assert "deadline" in (row.last_error or ""), row.last_error
    assert took < 2.0 + budget(1.5), f"a drip-fed reply held the attempt {took:.1f} s"
    receiver.close()


def test_a_huge_reply_is_not_read(outbox: Session) -> None:
    offered, sent, finished = 64 << 20, [0], threading.Event()

    def flood(handler: BaseHTTPRequestHandler) -> None:
        try:
            handler.wfile.write(f"HTTP/1.1 200 OK\r\ncontent-length: {offered}\r\n\r\n".encode())
            chunk = b"x" * (1 << 20)
            while sent[0] < offered:
                handler.wfile.write(chunk)
                sent[0] += len(chunk)
        finally:
            finished.set()

    receiver = Hostile(flood)
    ids = add_deliveries(outbox, "flood", receiver.url, 1)
    deliver_until(outbox, hostile_settings(), lambda: bool(attempted(outbox, ids)), budget(30))
    [row] = attempted(outbox, ids)
    assert (row.status, row.last_status_code) == ("delivered", 200), row.last_error
    assert finished.wait(UNLESS_BROKEN)
    # What the sockets' buffers took before the client hung up, far from the 64 MiB offered.
    assert sent[0] < 32 << 20, f"the client read {sent[0] >> 20} MiB of the reply"
    receiver.close()


def test_a_tenants_hanging_endpoint_delays_no_other_tenant(outbox: Session) -> None:
    release = threading.Event()

    def hang(handler: BaseHTTPRequestHandler) -> None:
        release.wait(UNLESS_BROKEN)
        handler.send_response(200)
        handler.end_headers()

    hanging, quick = Hostile(hang), Receiver()
    settings = hostile_settings(webhook_timeout_seconds=5.0, webhook_attempt_deadline_seconds=3.0)
    # The slow tenant's four deliveries are due first; the quick tenant's one after them.
    slow_ids = add_deliveries(outbox, "slow", hanging.url, 4, age=60)
    quick_ids = add_deliveries(outbox, "quick", quick.url, 1)
    try:
        took = deliver_until(outbox, settings, lambda: bool(quick.received), budget(30))
        assert quick.received, "the quick tenant's delivery never arrived"
        assert took < budget(2), f"the quick tenant waited {took:.1f} s behind another tenant's hanging endpoint"
        assert hanging.most_at_once <= settings.webhook_in_flight_per_tenant, hanging.most_at_once
        assert [row.status for row in attempted(outbox, quick_ids)] == ["delivered"]
    finally:
        release.set()
        deadline = time.monotonic() + UNLESS_BROKEN  # the slow tenant's attempts end at their deadline
        while len(attempted(outbox, slow_ids)) < hanging.most_at_once and time.monotonic() < deadline:
            time.sleep(0.1)
        hanging.close()


def certificate_for(name: str, folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signed for `name`: the CA's PEM, the certificate's and its key's."""
    pytest.importorskip("cryptography")  # (installed with the dev extras' moto and boto3)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def built(subject: str, issuer: str, key: Any, signer: Any, *, ca: bool) -> x509.Certificate:
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = folder / "ca.pem", folder / "leaf.pem", folder / "leaf.key"
    paths[0].write_bytes(built("test CA", "test CA", ca_key, ca_key, ca=True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(built(name, "test CA", leaf_key, ca_key, ca=False).public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return paths


def test_tls_to_a_pinned_address_names_the_host_and_checks_its_certificate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, leaf, key = certificate_for("hook.test", tmp_path)
    names: list[str | None] = []

    def answer(handler: BaseHTTPRequestHandler) -> None:
        names.append(handler.headers["host"])
        handler.send_response(201)
        handler.end_headers()

    receiver = Hostile(answer)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(leaf, key)
    served.sni_callback = lambda _socket, name, _context: names.append(name)  # type: ignore[assignment]
    receiver.server.socket = served.wrap_socket(receiver.server.socket, server_side=True)
    port = receiver.server.server_address[1]
    # Both names lead to the receiver (allowed although loopback); its certificate names only hook.test.
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *rest, **kw: real(
        "127.0.0.1" if host in ("hook.test", "other.test") else host, *rest, **kw))
    monkeypatch.setattr(webhooks, "_tls", lambda: ssl.create_default_context(cafile=str(ca)))
    settings = hostile_settings(webhook_allowed_hosts=["hook.test", "other.test"])
    deadline = time.monotonic() + budget(10)

    target = webhooks.check_target(f"https://hook.test:{port}/hook", settings)
    assert target.addresses == ("127.0.0.1",)
    assert webhooks.post(target, body=b"{}", headers={}, settings=settings, deadline=deadline) == 201
    assert names == ["hook.test", f"hook.test:{port}"]  # SNI, then the Host header
    with pytest.raises(Exception, match="certificate verify failed"):
        webhooks.post(webhooks.check_target(f"https://other.test:{port}/hook", settings), body=b"{}", headers={},
                      settings=settings, deadline=deadline)
    receiver.close()
