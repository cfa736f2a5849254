"""Shared pieces of the request/response models (OpenAI shapes)."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


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
