"""Webhooks in OpenAI's fine-tuning shape, signed per Standard Webhooks: endpoints per tenant, an outbox of
deliveries written with each job's terminal status change, and their delivery by workers with retries.

- Events: fine_tuning.job.succeeded, .failed, .cancelled; body {id, object: "event", type, created_at,
  data: {id}}, the same bytes on every attempt.
- Signing: the standardwebhooks library (webhook-id, webhook-timestamp, webhook-signature "v1,<base64
  HMAC-SHA256 of id.timestamp.body>") with the endpoint's whsec_ secret, shown once at creation.
- Endpoints: at most ADAPTERY_WEBHOOK_MAX_ENDPOINTS_PER_TENANT per tenant (429 past it).
- Outbox: `record_job_outcome` runs inside the job's status UPDATE transaction (jobs.py hands it to the
  lease transitions), so an outcome is never lost and a job never waits for a receiver.
- Delivery: every worker process runs `deliver_due` on a timer. A round claims due deliveries with a lease (one
  guarded UPDATE each, so one worker sends each), fair across tenants (one per tenant in turn, and never more than
  ADAPTERY_WEBHOOK_IN_FLIGHT_PER_TENANT of a tenant in flight over all workers), and no more than the process's
  `DeliveryPool` has free threads; the threads send them, so a slow receiver delays neither the timer nor the
  next delivery. An attempt is POSTed without following redirects or proxies, under
  ADAPTERY_WEBHOOK_TIMEOUT_SECONDS per connect/read/write and ADAPTERY_WEBHOOK_ATTEMPT_DEADLINE_SECONDS in all;
  only the status line and headers are read (16 KiB at most), never the body. Done on 2xx, else retried after
  1, 2, 4, … × ADAPTERY_WEBHOOK_RETRY_SECONDS until ADAPTERY_WEBHOOK_MAX_ATTEMPTS, then failed.
- Targets: http(s) URLs whose host is not the service's own and resolves to no loopback, link-local, unspecified
  or multicast address and no known cloud metadata address, IPv4 addresses carried inside IPv6 ones (mapped,
  compatible, 6to4, Teredo, NAT64) judged as the IPv4 address they reach; checked when the endpoint is created
  and again on each attempt, which resolves the name once and connects only to the addresses it checked (the URL's
  name still goes out as Host and as TLS SNI, and the certificate is checked against it), so a name that resolves
  differently the second time (DNS rebinding) cannot redirect it. ADAPTERY_WEBHOOK_ALLOWED_HOSTS lists hosts the
  operator allows anyway.
"""

from __future__ import annotations

import base64
import datetime
import functools
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.db.fork_guard import database_work
from app.db.models import TERMINAL_JOB_STATUSES, FineTuningJob, WebhookDelivery, WebhookEndpoint, now
from app.errors import InvalidRequest, LimitReached, NotFound
from app.settings import Settings

log = logging.getLogger("adaptery.webhooks")
EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
# A claimed delivery's lease outlives its attempt's deadline by this much, so no other worker takes it mid-attempt.
LEASE_MARGIN_SECONDS = 30.0
LEASE_SECONDS = 60.0  # claim_delivery's default (tests race claims with it)
# Cloud metadata services, which hand out credentials to whatever asks from inside the instance. Those on
# 169.254.0.0/16 are refused as link-local anyway and are named here for the message; the others sit on
# addresses that would otherwise pass (100.64/10 and fd00::/8 also hold ordinary private networks).
METADATA_ADDRESSES = {
    "169.254.169.254": "AWS, GCP, Azure, OpenStack and most others",
    "169.254.170.2": "AWS ECS task metadata",
    "fd00:ec2::254": "AWS over IPv6",
    "100.100.100.200": "Alibaba Cloud",
    "168.63.129.16": "Azure WireServer",
    "192.0.0.192": "Oracle Cloud",
}
# All a delivery needs of the answer is its status code: what is read of it (status line, headers and whatever
# follows them in the same read) is capped, in small reads.
ANSWER_BYTES = 16 * 1024
READ_BYTES = 4 * 1024
# NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address reached.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


# ---------------------------------------------------------------- targets


class ForbiddenTarget(Exception):
    """Why a URL may not receive webhooks (the message completes "The webhook URL …")."""


@dataclass(frozen=True)
class Target:
    """A URL that may receive webhooks, and the addresses its host resolved to when it was checked: the only
    addresses an attempt connects to."""

    url: str
    addresses: tuple[str, ...]


def _carried_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses that packets to an IPv6 address reach: the OS or a relay turns each into an IPv4 packet,
    so each is judged as the IPv4 address it carries."""
    carried = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        carried += list(address.teredo)  # (server, client)
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):  # (:: and ::1 are themselves)
        carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return carried


def _address_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    bare = ipaddress.ip_address(str(address).split("%")[0])  # a scope (fe80::1%eth0) does not change the class
    if str(bare) in METADATA_ADDRESSES:
        return f"resolves to a cloud metadata address ({bare}: {METADATA_ADDRESSES[str(bare)]})"
    if bare.is_loopback:
        return f"resolves to a loopback address ({bare}): this service's own host"
    if bare.is_link_local or bare.is_unspecified or bare.is_multicast:
        return f"resolves to a link-local, unspecified or multicast address ({bare})"
    if isinstance(bare, ipaddress.IPv6Address):
        for carried in _carried_ipv4(bare):
            reason = _address_reason(carried)
            if reason is not None:
                return f"{reason}, carried inside the IPv6 address {bare}"
    return None


def check_target(url: str, settings: Settings) -> Target:
    """Resolve the URL's host once and check every address it resolved to; raises ForbiddenTarget."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ForbiddenTarget("must be an http or https URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ForbiddenTarget("has an invalid port (accepted: 1 to 65535)") from None
    host = parts.hostname.lower()
    allowed = host in {h.lower() for h in settings.webhook_allowed_hosts}
    if not allowed and host in {settings.host.lower(), "localhost"} and settings.host not in ("0.0.0.0", "::"):
        raise ForbiddenTarget(f"points at this service's own host ({host})")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ForbiddenTarget(f"host {host!r} does not resolve ({exc})") from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allowed:
        for address in addresses:
            reason = _address_reason(ipaddress.ip_address(address))
            if reason is not None:
                raise ForbiddenTarget(reason)
    return Target(url=url, addresses=addresses)


def forbidden_reason(url: str, settings: Settings) -> str | None:
    """Why a URL may not receive webhooks, or None when it may."""
    try:
        check_target(url, settings)
    except ForbiddenTarget as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- endpoints


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def create_endpoint(session: Session, *, tenant_id: str, settings: Settings, url: str,
                    events: list[str] | None) -> WebhookEndpoint:
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint)
                           .where(WebhookEndpoint.tenant_id == tenant_id)) or 0
    if count >= settings.webhook_max_endpoints_per_tenant:
        # (Read, then written: two requests racing at the limit may both pass; a bound, not an exact count.)
        raise LimitReached(f"You have {count} webhook endpoints; at most {settings.webhook_max_endpoints_per_tenant} "
                           "are allowed (ADAPTERY_WEBHOOK_MAX_ENDPOINTS_PER_TENANT). Delete one first.", param="url",
                           code="too_many_webhooks", retry_after=60)
    reason = forbidden_reason(url, settings)
    if reason is not None:
        raise InvalidRequest(f"The webhook URL {reason}; ADAPTERY_WEBHOOK_ALLOWED_HOSTS lets the operator allow a "
                             "host.", param="url", code="invalid_webhook_url")
    chosen = list(dict.fromkeys(events)) if events else list(EVENT_TYPES)
    unknown = [e for e in chosen if e not in EVENT_TYPES]
    if unknown:
        raise InvalidRequest(f"Unknown event type(s) {unknown}; accepted: {list(EVENT_TYPES)}.", param="events",
                             code="invalid_request")
    endpoint = WebhookEndpoint(id=f"we_{secrets.token_hex(12)}", tenant_id=tenant_id, url=url, secret=new_secret(),
                               events=chosen, created_at=now())
    session.add(endpoint)
    session.commit()
    return endpoint


def list_endpoints(session: Session, *, tenant_id: str) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
                                .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)))


def get_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id) if len(endpoint_id) <= 64 else None
    if endpoint is None or endpoint.tenant_id != tenant_id:
        raise NotFound(f"No webhook endpoint found with id '{endpoint_id[:64]}'.", param="webhook_id",
                       code="not_found")
    return endpoint


def delete_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    session.query(WebhookDelivery).filter(WebhookDelivery.endpoint_id == endpoint.id).delete()
    session.delete(endpoint)
    session.commit()


def list_deliveries(session: Session, endpoint: WebhookEndpoint, *, limit: int = 100) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
                                .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit)))


# ---------------------------------------------------------------- the outbox


def record_job_outcome(session: Session, job_id: str, status: str) -> None:
    """In the transaction that moves a job to `status`: one pending delivery per endpoint of the job's tenant
    that wants this event (nothing for a status that is not an outcome)."""
    if status not in TERMINAL_JOB_STATUSES:
        return
    event_type = f"fine_tuning.job.{status}"
    tenant = session.scalar(select(FineTuningJob.tenant_id).where(FineTuningJob.id == job_id))
    for endpoint in session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant)):
        if event_type not in endpoint.events:
            continue
        event_id = f"evt_{secrets.token_hex(12)}"
        body = json.dumps({"id": event_id, "object": "event", "type": event_type, "created_at": now(),
                           "data": {"id": job_id}}, separators=(",", ":"))
        session.add(WebhookDelivery(id=event_id, endpoint_id=endpoint.id, tenant_id=endpoint.tenant_id,
                                    event_type=event_type, payload=body, status="pending", attempts=0,
                                    next_attempt_at=time.time(), created_at=now()))


# ---------------------------------------------------------------- delivery


def signed_headers(secret: str, event_id: str, body: str, moment: float) -> dict[str, str]:
    from standardwebhooks import Webhook

    stamp = datetime.datetime.fromtimestamp(int(moment), tz=datetime.UTC)
    return {"webhook-id": event_id, "webhook-timestamp": str(int(moment)),
            "webhook-signature": Webhook(secret).sign(event_id, stamp, body), "content-type": "application/json",
            "user-agent": "Adaptery-Webhooks/1"}


def claim_delivery(session: Session, delivery_id: str, owner: str, *, lease_seconds: float = LEASE_SECONDS) -> bool:
    """Take a due delivery for one attempt; exactly one of several workers racing for it wins."""
    moment = time.time()
    result = session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
        WebhookDelivery.next_attempt_at <= moment,
        or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < moment))
        .values(lease_owner=owner, lease_expires_at=moment + lease_seconds,
                attempts=WebhookDelivery.attempts + 1))
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def claim_due(session: Session, settings: Settings, *, owner: str, free: int) -> list[str]:
    """Claim up to `free` due deliveries, fair across tenants: the tenants with the oldest due deliveries first,
    one delivery per tenant in turn, and none for a tenant that already has ADAPTERY_WEBHOOK_IN_FLIGHT_PER_TENANT
    in flight (leased by any worker). The count is read before claiming, so workers claiming at the same moment
    may each fill a tenant's share: then the cap holds per worker, which still bounds what one tenant takes."""
    if free <= 0:
        return []
    moment = time.time()
    in_flight = dict(session.execute(
        select(WebhookDelivery.tenant_id, func.count()).where(
            WebhookDelivery.status == "pending", WebhookDelivery.lease_expires_at >= moment)
        .group_by(WebhookDelivery.tenant_id)).tuples().all())
    due = (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= moment,
           or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < moment))
    oldest = func.min(WebhookDelivery.next_attempt_at)
    # One slot per tenant in turn: no more than `free` tenants can get one this round.
    tenants = session.scalars(select(WebhookDelivery.tenant_id).where(*due).group_by(WebhookDelivery.tenant_id)
                              .order_by(oldest).limit(free)).all()
    queues: list[list[str]] = []
    for tenant in tenants:
        share = min(settings.webhook_in_flight_per_tenant - in_flight.get(tenant, 0), free)
        if share > 0:
            queues.append(list(session.scalars(select(WebhookDelivery.id).where(
                *due, WebhookDelivery.tenant_id == tenant).order_by(WebhookDelivery.next_attempt_at).limit(share))))
    lease = settings.webhook_attempt_deadline_seconds + LEASE_MARGIN_SECONDS
    claimed: list[str] = []
    for turn in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if turn < len(queue) and len(claimed) < free and claim_delivery(session, queue[turn], owner,
                                                                            lease_seconds=lease):
                claimed.append(queue[turn])  # (a lost race means another worker has it)
    return claimed


class DeliveryPool:
    """The threads of one process that send deliveries, a bounded number, and how many of them are free: a round
    claims no more than can start at once, since a claimed delivery waiting in a queue would burn its lease.
    Rounds come from one timer thread, so counting free threads and submitting need no reservation."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adaptery-webhook")
        self._busy = 0
        self._lock = threading.Lock()

    def free(self) -> int:
        with self._lock:
            return self.threads - self._busy

    def submit(self, action: Callable[[], None]) -> None:
        def run() -> None:
            try:
                action()
            except Exception:  # one delivery's failure must not reach the others (its lease expires, it is retried)
                log.exception("webhook delivery failed")
            finally:
                with self._lock:
                    self._busy -= 1

        with self._lock:
            self._busy += 1
        self._executor.submit(run)


_pools: dict[int, DeliveryPool] = {}
_pools_lock = threading.Lock()


def delivery_pool(settings: Settings) -> DeliveryPool:
    """This process's pool of ADAPTERY_WEBHOOK_DELIVERY_THREADS threads (made on first use)."""
    with _pools_lock:
        threads = settings.webhook_delivery_threads
        if threads not in _pools:
            _pools[threads] = DeliveryPool(threads)
        return _pools[threads]


def deliver_due(session: Session, settings: Settings, *, owner: str, pool: DeliveryPool | None = None) -> int:
    """One round: claim the due deliveries this process has threads free for (fairly, see claim_due) and hand
    them to the pool's threads, without waiting for them; returns how many were claimed."""
    pool = pool or delivery_pool(settings)
    claimed = claim_due(session, settings, owner=owner, free=pool.free())
    bind = session.get_bind()
    for delivery_id in claimed:
        pool.submit(functools.partial(attempt_delivery, bind, settings, delivery_id, owner=owner))
    return len(claimed)


def attempt_delivery(bind: Any, settings: Settings, delivery_id: str, *, owner: str) -> None:
    """One claimed attempt, on a delivery thread: no database connection is held while the receiver is waited on."""
    deadline = time.monotonic() + settings.webhook_attempt_deadline_seconds
    # The database parts are marked so the worker never forks a training process in their midst (fork_guard.py).
    with database_work(), Session(bind=bind, expire_on_commit=False) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id) if delivery is not None else None
        if delivery is None or endpoint is None:
            return  # the endpoint was deleted with its deliveries
        url, secret, payload = endpoint.url, endpoint.secret, delivery.payload
    status_code, error = None, None
    try:
        target = check_target(url, settings)
        status_code = post(target, body=payload.encode(), headers=signed_headers(secret, delivery_id, payload,
                                                                                  time.time()),
                           settings=settings, deadline=deadline)
        error = None if 200 <= status_code < 300 else f"answered {status_code}"
    except ForbiddenTarget as exc:
        error = f"The webhook URL {exc}"
    except Exception as exc:  # whatever a receiver does is this attempt's error, never the worker's
        error = f"{type(exc).__name__}: {exc}"[:500]
        if time.monotonic() >= deadline:
            error = (f"no answer within the attempt's deadline of {settings.webhook_attempt_deadline_seconds:g} s "
                     f"(ADAPTERY_WEBHOOK_ATTEMPT_DEADLINE_SECONDS); {error}")[:500]
    with database_work(), Session(bind=bind, expire_on_commit=False) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.lease_owner != owner:
            return  # deleted meanwhile, or the lease was lost: its new holder records its own attempt
        _record_attempt(session, delivery, settings, status_code=status_code, error=error)


# ---------------------------------------------------------------- sending, pinned and bounded


@functools.lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    # httpx's default context (certifi's CAs, hostname checks on), trust_env off: no SSLKEYLOGFILE or SSL_CERT_*.
    return httpx.create_ssl_context(trust_env=False)


def post(target: Target, *, body: bytes, headers: dict[str, str], settings: Settings, deadline: float) -> int:
    """POST `body` to the target's URL, connecting only to its checked addresses, and return the status code.
    Only the status line and headers are read, at most ANSWER_BYTES in all (_DeadlineStream); the body is never
    read, and closing the connection discards it. Every connect, write and read gets at most
    ADAPTERY_WEBHOOK_TIMEOUT_SECONDS and ends by `deadline` (time.monotonic()), so a reply drip-fed within each
    read's timeout still ends."""
    timeout = settings.webhook_timeout_seconds
    # The request as httpx's own transport builds it for httpcore (IPv6 literals and IDNA names included).
    url = httpx.URL(target.url)
    request_url = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
    with (httpcore.ConnectionPool(ssl_context=_tls(), network_backend=_PinnedBackend(target.addresses, deadline),
                                  max_connections=1, retries=0) as pool,
          pool.stream("POST", request_url, headers=[("Host", url.netloc.decode("ascii")), *headers.items()],
                      content=body, extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout,
                                                            "pool": timeout}}) as response):
        return response.status


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every operation ends by the attempt's deadline (time.monotonic()), and that reads at most
    ANSWER_BYTES, in reads of at most READ_BYTES: httpcore would read 64 KiB at a time, and h11 lets headers grow
    to 100 KiB."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner, self._deadline, self._read = inner, deadline, 0

    def _left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise error("the attempt's deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._read >= ANSWER_BYTES:
            raise httpcore.ReadError(f"the answer's status line and headers exceed {ANSWER_BYTES} bytes")
        data = self._inner.read(min(max_bytes, READ_BYTES, ANSWER_BYTES - self._read),
                                self._left(timeout, httpcore.ReadTimeout))
        self._read += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        # server_hostname is the URL's name: SNI and the certificate check use it, not the pinned address.
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     self._left(timeout, httpcore.ConnectTimeout)), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the addresses the check resolved, in order, whatever name the URL has: a second resolution
    (DNS rebinding) never happens."""

    def __init__(self, addresses: Iterable[str], deadline: float) -> None:
        self._addresses, self._deadline, self._inner = list(addresses), deadline, httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        error: Exception = httpcore.ConnectError(f"{host} resolved to no address")
        for address in self._addresses:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise httpcore.ConnectTimeout("the attempt's deadline passed")
            try:
                stream = self._inner.connect_tcp(address, port, left if timeout is None else min(timeout, left),
                                                 local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc  # the next address may answer
                continue
            return _DeadlineStream(stream, self._deadline)
        raise error

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are sent over TCP only")

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self._deadline - time.monotonic())))


def _record_attempt(session: Session, delivery: WebhookDelivery, settings: Settings, *, status_code: int | None,
                    error: str | None) -> None:
    delivery.last_status_code, delivery.last_error = status_code, error
    delivery.lease_owner, delivery.lease_expires_at = None, None
    if error is None:
        delivery.status, delivery.delivered_at = "delivered", now()
    elif delivery.attempts >= settings.webhook_max_attempts:
        delivery.status = "failed"
        log.warning("webhook %s to endpoint %s failed after %d attempts: %s", delivery.id, delivery.endpoint_id,
                    delivery.attempts, error)
    else:
        delivery.next_attempt_at = time.time() + settings.webhook_retry_seconds * 2 ** (delivery.attempts - 1)
    session.commit()


def delivery_object(delivery: WebhookDelivery) -> dict[str, Any]:
    return {"id": delivery.id, "object": "webhook_delivery", "type": delivery.event_type,
            "status": delivery.status, "attempts": delivery.attempts, "created_at": delivery.created_at,
            "delivered_at": delivery.delivered_at, "last_status_code": delivery.last_status_code,
            "last_error": delivery.last_error, "payload": json.loads(delivery.payload)}


def endpoint_object(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": endpoint.id, "object": "webhook_endpoint", "url": endpoint.url,
                            "events": endpoint.events, "created_at": endpoint.created_at}
    if with_secret:
        body["secret"] = endpoint.secret
    return body
