"""Ids the service hands out, and the one check every id or name from a request passes before a lookup."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def storable(key: str) -> bool:
    """Whether an id or name from a request could be stored at all. PostgreSQL text cannot hold NUL, and
    comparing a column with such a string is an error rather than a miss: look it up only when this holds."""
    return "\x00" not in key
