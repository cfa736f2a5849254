"""/health and /ready answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Health(BaseModel):
    status: Literal["ok"]


class Check(BaseModel):
    """One readiness check: ok, and what it found (error, heartbeat age, warm-up state and timing)."""

    model_config = ConfigDict(extra="allow")

    ok: bool


class Ready(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, Check]
