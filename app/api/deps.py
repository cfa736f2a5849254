"""Dependencies shared by the routers: settings, a database session, the calling tenant (by API key), and the
tenant's object a path names (JobDep, FileDep, AdapterDep, EvaluationDep, WebhookDep): ownership is checked once,
here, and another tenant's object is a 404 exactly as a missing one is."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy.orm import Session

from app.db.models import Adapter, Evaluation, File, FineTuningJob, WebhookEndpoint
from app.db.session import get_sessionmaker
from app.errors import Unauthorized
from app.services import datasets, evaluations, inference, jobs, rate_limit, tenants, webhooks
from app.settings import Settings, get_settings


def _session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(_session)]


# Declared as a security scheme, so the OpenAPI document (and /docs's Authorize button) knows about it.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _key(credentials: HTTPAuthorizationCredentials | None) -> str:
    return tenants.bearer(f"Bearer {credentials.credentials}" if credentials else None)


def _tenant(request: Request, session: SessionDep, settings: SettingsDep, credentials: Credentials) -> str:
    key = _key(credentials)
    tenant = tenants.tenant_for_key(session, key)
    if tenant is None:
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    request.state.tenant = tenant  # for the request's log line (app/logs.py)
    if not _forwarded_by_api(request, settings):  # the API counted it already
        rate_limit.check(settings, tenants.hash_key(key)[:16])
    return tenant


def _forwarded_by_api(request: Request, settings: Settings) -> bool:
    given = request.headers.get("x-adaptery-internal-key", "")
    return bool(settings.role == "inference" and settings.internal_key and given
                and hmac.compare_digest(given.encode(), settings.internal_key.encode()))


def _admin(settings: SettingsDep, credentials: Credentials) -> None:
    if not tenants.is_admin_key(_key(credentials), settings.admin_key):
        raise Unauthorized("This route needs the admin key (ADAPTERY_ADMIN_KEY).", code="invalid_api_key")


TenantDep = Annotated[str, Depends(_tenant)]
AdminDep = Annotated[None, Depends(_admin)]


def _job(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    return jobs.get_job(session, tenant_id=tenant, job_id=fine_tuning_job_id)


def _file(file_id: str, session: SessionDep, tenant: TenantDep) -> File:
    return datasets.get_file(session, tenant_id=tenant, file_id=file_id)


def _adapter(adapter_id: str, session: SessionDep, tenant: TenantDep) -> Adapter:
    return inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)


def _evaluation(evaluation_id: str, session: SessionDep, tenant: TenantDep) -> Evaluation:
    return evaluations.get_evaluation(session, tenant_id=tenant, evaluation_id=evaluation_id)


def _webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> WebhookEndpoint:
    return webhooks.get_endpoint(session, tenant_id=tenant, endpoint_id=webhook_id)


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
