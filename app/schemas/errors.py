"""The error answer every route documents: OpenAI's shape, one description per status, and its headers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong and what would be accepted")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(description="the field, parameter or header at fault, when there is one")
    code: str | None = Field(description="a stable machine-readable code, e.g. not_found, invalid_file")


class ErrorResponse(BaseModel):
    """{"error": {"message", "type", "param", "code"}}"""

    error: ErrorDetail


_RETRY_AFTER = {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}

_ANSWERS: dict[int, dict[str, Any]] = {
    400: {"description": "The request is malformed or names something unusable; `param` names the field."},
    401: {"description": "No API key, or one that is not valid for this route.",
          "headers": {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}}},
    403: {"description": "The caller may not do this to the object (only the operator may)."},
    404: {"description": "No such object for this caller."},
    409: {"description": "The object's state does not allow this now.",
          "headers": {"Retry-After": {**_RETRY_AFTER, "required": False}}},
    413: {"description": "The upload is over its size limit."},
    422: {"description": "Well-formed, but the server cannot use it (an adapter that does not fit the base model)."},
    429: {"description": "Rate limit or quota reached.",
          "headers": {"Retry-After": {**_RETRY_AFTER, "required": True}}},
    503: {"description": "Something the request needs cannot take it now (no inference replica answers, in role api; "
                         "no adapter slot came free within the bounded wait); retry later.",
          "headers": {"Retry-After": {**_RETRY_AFTER, "required": False}}},
    504: {"description": "The generation did not finish within the server's generation timeout and was ended."},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the error statuses it can answer with, each in the error shape."""
    return {status: {"model": ErrorResponse, **_ANSWERS[status]} for status in statuses}
