"""Webhooks in OpenAI's fine-tuning shape, signed per Standard Webhooks: endpoints per tenant, an outbox of
deliveries written with each job's terminal status change, and their delivery by workers with retries.

- Events: fine_tuning.job.succeeded, .failed, .cancelled; body {id, object: "event", type, created_at,
  data: {id}}, the same bytes on every attempt.
- Signing: the standardwebhooks library (webhook-id, webhook-timestamp, webhook-signature "v1,<base64
  HMAC-SHA256 of id.timestamp.body>") with the endpoint's whsec_ secret, shown once at creation.
- Outbox: `record_job_outcome` runs inside the job's status UPDATE transaction (jobs.py hands it to the
  lease transitions), so an outcome is never lost and a job never waits for a receiver.
- Delivery: every worker process runs `deliver_due` on a timer; a delivery is claimed with a lease (one
  guarded UPDATE, so one worker sends it), POSTed without following redirects, done on 2xx, else retried
  after 1, 2, 4, … × ADAPTERY_WEBHOOK_RETRY_SECONDS until ADAPTERY_WEBHOOK_MAX_ATTEMPTS, then failed.
- Targets: http(s) URLs whose host resolves to no loopback, link-local (cloud metadata included),
  unspecified or multicast address and is not the service's own host, checked when the endpoint is created
  and again before each attempt; ADAPTERY_WEBHOOK_ALLOWED_HOSTS lists hosts the operator allows anyway.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import logging
import secrets
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.db.models import TERMINAL_JOB_STATUSES, FineTuningJob, WebhookDelivery, WebhookEndpoint, now
from app.errors import InvalidRequest, NotFound
from app.settings import Settings

log = logging.getLogger("adaptery.webhooks")
EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
LEASE_SECONDS = 60.0
# Cloud metadata services sit at link-local addresses, which are refused as a whole; named for the message.
METADATA_ADDRESSES = {"169.254.169.254", "fd00:ec2::254"}


# ---------------------------------------------------------------- targets


def forbidden_reason(url: str, settings: Settings) -> str | None:
    """Why a URL may not receive webhooks, or None when it may."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL with a host"
    host = parts.hostname.lower()
    if host in {h.lower() for h in settings.webhook_allowed_hosts}:
        return None
    if host in {settings.host.lower(), "localhost"} and settings.host not in ("0.0.0.0", "::"):
        return f"points at this service's own host ({host})"
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"host {host!r} does not resolve ({exc})"
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if str(address) in METADATA_ADDRESSES:
            return f"resolves to a cloud metadata address ({address})"
        if address.is_loopback:
            return f"resolves to a loopback address ({address}): this service's own host"
        if address.is_link_local or address.is_unspecified or address.is_multicast:
            return f"resolves to a link-local, unspecified or multicast address ({address})"
    return None


# ---------------------------------------------------------------- endpoints


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def create_endpoint(session: Session, *, tenant_id: str, settings: Settings, url: str,
                    events: list[str] | None) -> WebhookEndpoint:
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


def claim_delivery(session: Session, delivery_id: str, owner: str) -> bool:
    """Take a due delivery for one attempt; exactly one of several workers racing for it wins."""
    moment = time.time()
    result = session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
        WebhookDelivery.next_attempt_at <= moment,
        or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < moment))
        .values(lease_owner=owner, lease_expires_at=moment + LEASE_SECONDS,
                attempts=WebhookDelivery.attempts + 1))
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def deliver_due(session: Session, settings: Settings, *, owner: str, limit: int = 20) -> int:
    """Send the deliveries that are due (each claimed by lease first); returns how many were attempted."""
    import httpx

    due = list(session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= time.time())
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)))
    attempted = 0
    for delivery_id in due:
        if not claim_delivery(session, delivery_id, owner):
            continue  # another worker has it
        attempted += 1
        delivery = session.get(WebhookDelivery, delivery_id)
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id) if delivery is not None else None
        if delivery is None or endpoint is None:
            continue
        status_code, error = None, forbidden_reason(endpoint.url, settings)
        if error is None:
            try:
                response = httpx.post(endpoint.url, content=delivery.payload.encode(),
                                      headers=signed_headers(endpoint.secret, delivery.id, delivery.payload,
                                                             time.time()),
                                      timeout=settings.webhook_timeout_seconds, follow_redirects=False)
                status_code = response.status_code
                error = None if response.is_success else f"answered {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        _record_attempt(session, delivery, settings, status_code=status_code, error=error)
    return attempted


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
