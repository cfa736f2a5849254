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


# A base model's id: what clients pass as `model` and what names its training queues (no ':', so never ft:...).
BASE_MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class BaseModelCreate(Request):
    id: str = Field(pattern=BASE_MODEL_ID, description="the name clients will pass as `model`")
    # PostgreSQL text cannot hold NUL.
    source: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$",
                        json_schema_extra={"format": "base-model-source"},
                        description="an absolute folder path on the hosts that serve and train it (config.json, "
                                    "tokenizer, *.safetensors), or a hub id (owner/name) on a host with internet")


class BaseModelMemory(BaseModel):
    device: str = Field(description="this host's device the figures are for")
    dtype: str = Field(description="the dtype the engine would hold the weights in")
    needed_bytes: int = Field(description="the weights' bytes in that dtype")
    free_bytes: int = Field(description="what the device had free when it was checked")


class BaseModelObject(BaseModel):
    id: str
    object: Literal["base_model"] = "base_model"
    source: str = Field(description="the folder or hub id, or gguf:... for the packaged default")
    origin: Literal["default", "settings", "api"] = Field(
        description="the packaged default, ADAPTERY_BASE_MODELS, or registered over the API (the only ones the API "
                    "removes)")
    created_at: int | None = Field(description="when it was registered over the API")
    family: str | None = Field(description="its architecture (transformers' model_type); null while its files are "
                                           "not on this host")
    parameters: int | None
    context_length: int | None
    dtype: str | None = Field(description="the dtype its checkpoint stores the weights in")
    chat_template: Literal["model", "default"] | None = Field(
        description="model: the tokenizer's own; default: it has none, and chat uses Adaptery's plain "
                    "'role: content' template (completions work with every model)")
    methods: list[str] = Field(description="the fine-tuning methods it can train and serve")
    memory: BaseModelMemory | None = Field(default=None, description="at registration: what it needs on this "
                                                                     "host's device against what is free")


class BaseModelDeleted(BaseModel):
    id: str
    object: Literal["base_model"] = "base_model"
    deleted: bool
