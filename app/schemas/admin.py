"""Admin requests and objects: tenants, API keys (the key itself is shown once), adapter visibility."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.common import Request


class TenantCreate(Request):
    # PostgreSQL text cannot hold NUL.
    name: str = Field(min_length=1, max_length=255, pattern=r"^[^\x00]*$")


class Visibility(Request):
    public: bool


class TenantObject(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: int


class TenantCreated(TenantObject):
    api_key: str = Field(description="the tenant's first API key; shown only now")


class ApiKeyObject(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: int
    revoked_at: int | None


class ApiKeyCreated(ApiKeyObject):
    api_key: str = Field(description="the key; shown only now")


class AdapterVisibility(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    public: bool
