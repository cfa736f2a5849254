"""Dependencies shared by the routers: settings, a database session, the calling tenant (by API key), and the
tenant's object a path names (JobDep, FileDep, AdapterDep, EvaluationDep, WebhookDep): ownership is checked once,
here, and another tenant's object is a 404 exactly as a missing one is."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy.orm import Session

from app import logs
from app.db.models import Adapter, Evaluation, File, FineTuningJob, WebhookEndpoint
from app.db.session import get_sessionmaker
from app.errors import Unauthorized
from app.services import datasets, evaluations, inference, jobs, rate_limit, tenants, webhooks
from app.settings import Settings, get_settings

# The request's dependencies are async where they do no blocking I/O: FastAPI runs a plain `def` dependency in its
# thread pool, and each such hop hands the interpreter lock to a worker thread and back, which under load cost every
# request (a tenant's refused retries included) more than its own work (measured: bench/noisy_neighbour.py).


async def _session() -> AsyncIterator[Session]:
    session = get_sessionmaker()()  # no I/O: a connection is taken when the route first uses the session
    try:
        yield session
    finally:
        if session.in_transaction():  # it holds a connection: give it back (a rollback) off the event loop,
            # on a thread of its own as FastAPI closes a sync dependency: the pool's threads may all be routes
            # waiting for a connection that only this close would free.
            await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()


async def _settings() -> Settings:
    return get_settings()


_Object = TypeVar("_Object")

SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]


# Declared as a security scheme, so the OpenAPI document (and /docs's Authorize button) knows about it.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _key(credentials: HTTPAuthorizationCredentials | None) -> str:
    return tenants.bearer(f"Bearer {credentials.credentials}" if credentials else None)


def _client_address(scope: Any) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _tenant_of_key(key: str, client_address: str, settings: Settings) -> str:
    """The tenant a key belongs to; a wrong key is a 401, and a client address that keeps sending wrong keys is
    refused for the rest of the minute (a 429) before any lookup, so keys cannot be guessed at the API's speed."""
    rate_limit.check_failed_authentication(settings, client_address)
    # A session of its own, closed at once: the request's session (SessionDep) lives until its response has been
    # sent, so a lookup there would hold a pooled connection for a whole stream or a long generation.
    tenant = tenants.cached_tenant_for_key(get_sessionmaker(), key)
    if tenant is None:
        rate_limit.record_failed_authentication(settings, client_address)
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    return tenant


async def _tenant_for(key: str, scope: Any, settings: Settings) -> str:
    """A key found valid in the last seconds is answered here; a lookup goes to a thread. (A cached key is valid, so
    it skips the wrong-key limit of its address: that limit is there against guessing.)"""
    known = tenants.known_tenant_for_key(key)
    if known is not None:
        return known
    return await anyio.to_thread.run_sync(_tenant_of_key, key, _client_address(scope), settings)


async def verify_before_body(scope: Any, authorization: str | None, settings: Settings) -> None:
    """The key check of a request with a body, run by app/request_guard.py before the body is read. The tenant
    it finds is kept in the request's state, so `_tenant` does not look it up again."""
    key = tenants.bearer(authorization)
    if scope["path"].startswith("/v1/admin/"):
        _check_admin_key(key, settings, _client_address(scope))
        return
    tenant = await _tenant_for(key, scope, settings)
    scope.setdefault("state", {})["verified_key"] = (tenants.hash_key(key), tenant)


async def _tenant(request: Request, settings: SettingsDep, credentials: Credentials) -> str:
    key = _key(credentials)
    verified = getattr(request.state, "verified_key", None)
    if verified is not None and hmac.compare_digest(verified[0], tenants.hash_key(key)):
        tenant = str(verified[1])
    else:
        tenant = await _tenant_for(key, request.scope, settings)
    request.state.tenant = tenant  # for the request's log line (app/logs.py)
    request.state.key_hash = tenants.hash_key(key)  # a long stream checks that its key still stands
    if not logs.forwarded_by_api(request, settings):  # the API counted it already
        if rate_limit.counts_in_redis(settings):
            await anyio.to_thread.run_sync(rate_limit.check, settings, tenants.hash_key(key)[:16])
        else:
            rate_limit.check(settings, tenants.hash_key(key)[:16])
    return tenant


def _check_admin_key(key: str, settings: Settings, client_address: str) -> None:
    rate_limit.check_failed_authentication(settings, client_address)
    if not tenants.is_admin_key(key, settings.admin_key):
        rate_limit.record_failed_authentication(settings, client_address)
        raise Unauthorized("This route needs the admin key (ADAPTERY_ADMIN_KEY).", code="invalid_api_key")


def _admin(request: Request, settings: SettingsDep, credentials: Credentials) -> None:
    _check_admin_key(_key(credentials), settings, _client_address(request.scope))


TenantDep = Annotated[str, Depends(_tenant)]
AdminDep = Annotated[None, Depends(_admin)]


def _loaded(session: Session, found: _Object) -> _Object:
    """`found`, with the session's connection back in the pool: the route runs in another thread-pool turn, and a
    connection held across that wait lets a burst of requests hold the whole pool while waiting for threads that
    are all blocked waiting for a connection. (Nothing is pending here; expire_on_commit is off, so `found` keeps
    its loaded attributes.)"""
    session.commit()
    return found


def _job(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    return _loaded(session, jobs.get_job(session, tenant_id=tenant, job_id=fine_tuning_job_id))


def _file(file_id: str, session: SessionDep, tenant: TenantDep) -> File:
    return _loaded(session, datasets.get_file(session, tenant_id=tenant, file_id=file_id))


def _adapter(adapter_id: str, session: SessionDep, tenant: TenantDep) -> Adapter:
    return _loaded(session, inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id))


def _evaluation(evaluation_id: str, session: SessionDep, tenant: TenantDep) -> Evaluation:
    return _loaded(session, evaluations.get_evaluation(session, tenant_id=tenant, evaluation_id=evaluation_id))


def _webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> WebhookEndpoint:
    return _loaded(session, webhooks.get_endpoint(session, tenant_id=tenant, endpoint_id=webhook_id))


JobDep = Annotated[FineTuningJob, Depends(_job)]
FileDep = Annotated[File, Depends(_file)]
AdapterDep = Annotated[Adapter, Depends(_adapter)]
EvaluationDep = Annotated[Evaluation, Depends(_evaluation)]
WebhookDep = Annotated[WebhookEndpoint, Depends(_webhook)]


# The idempotency service checks the key's length itself (with its own message); the document says the same.
# A header is sent or not, never null, hence SkipJsonSchema.
IdempotencyKey = Annotated[str | SkipJsonSchema[None], Header(
    description="the same key and body replay the first answer; the same key with another body is a 409",
    json_schema_extra={"minLength": 1, "maxLength": 255})]
