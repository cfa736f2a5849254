"""Adapter objects (/v1/adapters): where each adapter is in the serving process, and the model objects of /v1/models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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
