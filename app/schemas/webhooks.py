"""Webhook endpoint and delivery shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import Request

EventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


class WebhookCreate(Request):
    url: str = Field(min_length=1, max_length=2000, json_schema_extra={"format": "webhook-url"},
                     description="an http(s) URL that receives the events, on a host that is not this service's "
                                 "own and resolves to no loopback, link-local, unspecified, multicast or cloud "
                                 "metadata address (IPv4 addresses inside IPv6 ones count as themselves); at most "
                                 "ADAPTERY_WEBHOOK_MAX_ENDPOINTS_PER_TENANT endpoints per tenant")
    events: list[EventType] | None = Field(default=None, max_length=3,
                                           description="the events to send (default: all three)")


class WebhookObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    created_at: int
    secret: str | None = Field(default=None, description="whsec_…: verifies signatures; only in the response "
                                                          "that creates the endpoint")


class DeliveryObject(BaseModel):
    id: str = Field(description="the event id, sent as webhook-id (the same on every attempt)")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    type: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: int
    delivered_at: int | None
    last_status_code: int | None
    last_error: str | None
    payload: dict[str, Any]
