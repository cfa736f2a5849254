"""Shared pieces of the request/response models (OpenAI shapes)."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

T = TypeVar("T")


def _metadata_limits(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return value
    if len(value) > 16:
        raise ValueError("at most 16 metadata keys")
    for key, item in value.items():
        if not key or len(key) > 64 or len(item) > 512:
            raise ValueError("metadata keys must be 1-64 characters and values at most 512 characters")
    return value


# A request's `metadata`, within OpenAI's limits: at most 16 pairs, keys of 1-64 characters, values of at most 512.
# The validator enforces what json_schema_extra tells clients in the OpenAPI document.
Metadata = Annotated[dict[str, str] | None, AfterValidator(_metadata_limits), Field(json_schema_extra={
    "maxProperties": 16, "propertyNames": {"minLength": 1, "maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 512}})]


class Request(BaseModel):
    """Request bodies forbid unknown fields, so a typo is an error naming the field, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class ListResponse(BaseModel, Generic[T]):
    """{"object": "list", "data": [...], "has_more": ...}; lists that are not paged say has_more: false."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False


class PagedList(ListResponse[T], Generic[T]):
    """A cursor-paged list: pass last_id as `after` for the next page."""

    first_id: str | None = None
    last_id: str | None = None


def paged(items: list[Any], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


def listed(items: list[Any]) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": False}
