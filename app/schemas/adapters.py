"""Adapter objects (/v1/adapters): where each adapter is in the serving process, and the model objects of /v1/models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.common import Request


class AdapterObject(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str = Field(description="the model name to use for inference")
    base_model: str
    method: str
    job_id: str | None = Field(description="the job that trained it; null when imported")
    created_at: int
    size_bytes: int
    state: Literal["on_disk", "cpu", "active", "failed"]
    pinned: bool
    last_used_at: float | None
    load_ms: float | None
    rank: int | None
    error: str | None = Field(description="why loading failed (state failed)")


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="system for base models, your tenant id for your fine-tuned models, public "
                                      "for another tenant's public adapter (whose id is its model name)")
    parent: str | None = Field(description="the base model of a fine-tuned model")
    method: str | None = Field(default=None, description="fine-tuned models: the fine-tuning method")
    job_id: str | None = Field(default=None, description="your fine-tuned models: the job that trained it")
    # Base models only (null while a base model's files are not on this host); OpenAI's fields above stay as they are.
    family: str | None = Field(default=None, description="base models: the architecture (transformers' model_type)")
    parameters: int | None = Field(default=None, description="base models: the parameter count")
    context_length: int | None = Field(default=None, description="base models: the longest context, in tokens")
    methods: list[str] | None = Field(default=None, description="base models: the fine-tuning methods it trains "
                                                                "and serves")


class AliasPromote(Request):
    model: str = Field(description="one of your fine-tuned models, checkpoints or imports (by name or id)",
                       min_length=1, max_length=255)


class AliasChange(BaseModel):
    action: Literal["promote", "rollback"]
    model: str | None = Field(description="the model it pointed to after the change (null: deleted since)")
    adapter_id: str
    previous_adapter_id: str | None
    created_at: int


class AliasObject(BaseModel):
    id: str = Field(description="the alias: pass it as `model` to chat and completions")
    object: Literal["model.alias"] = "model.alias"
    model: str | None = Field(description="the model it points to now")
    adapter_id: str
    updated_at: int
    history: list[AliasChange] | None = Field(default=None, description="every change, oldest first (GET one)")
