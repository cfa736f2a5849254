"""/v1/webhooks: a tenant's webhook endpoints (the secret shown once) and their deliveries."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, TenantDep, WebhookDep
from app.schemas.common import ListResponse, listed
from app.schemas.errors import errors
from app.schemas.webhooks import DeliveryObject, WebhookCreate, WebhookObject
from app.services import webhooks

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", response_model=WebhookObject, responses=errors(400, 401, 429))
def create_webhook(body: WebhookCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Any:
    endpoint = webhooks.create_endpoint(session, tenant_id=tenant, settings=settings, url=body.url,
                                        events=list(body.events) if body.events else None)
    return webhooks.endpoint_object(endpoint, with_secret=True)


@router.get("", response_model=ListResponse[WebhookObject], responses=errors(401, 429))
def list_webhooks(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return listed([webhooks.endpoint_object(e) for e in webhooks.list_endpoints(session, tenant_id=tenant)])


@router.delete("/{webhook_id}", responses=errors(401, 404, 429))
def delete_webhook(endpoint: WebhookDep, session: SessionDep) -> dict[str, Any]:
    endpoint_id = endpoint.id
    webhooks.delete_endpoint(session, endpoint)
    return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}


@router.get("/{webhook_id}/deliveries", response_model=ListResponse[DeliveryObject], responses=errors(401, 404, 429))
def list_deliveries(endpoint: WebhookDep, session: SessionDep) -> dict[str, Any]:
    return listed([webhooks.delivery_object(d) for d in webhooks.list_deliveries(session, endpoint)])
