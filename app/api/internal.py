"""/internal/state (role inference): what the API's router reads from each replica, and /internal/adapters/{id}/unpin,
the admin's unpin on this replica. Authenticated with the shared ADAPTERY_INTERNAL_KEY, left out of the public
OpenAPI document."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Header

from app.api.deps import SettingsDep
from app.errors import Unauthorized
from app.metrics import engine_gauges
from app.services import tokenizers
from app.services.inference import engine_if_started, unpin_everywhere

router = APIRouter(include_in_schema=False)


def check_internal_key(settings: Any, authorization: str | None) -> None:
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not settings.internal_key or not hmac.compare_digest(given.encode(), settings.internal_key.encode()):
        raise Unauthorized("This route needs the internal key (ADAPTERY_INTERNAL_KEY).", code="invalid_api_key")


@router.get("/internal/state")
def state(settings: SettingsDep, authorization: str | None = Header(default=None)) -> dict[str, Any]:
    check_internal_key(settings, authorization)
    held: dict[str, str] = {}
    pinned: list[str] = []
    # What the API shows of each adapter this replica holds (GET /v1/adapters), as one process would.
    details: dict[str, dict[str, Any]] = {}
    in_flight = 0
    engine = engine_if_started()
    for runtime in (engine.runtimes().values() if engine is not None else []):
        for record in runtime.adapters.residencies():
            if str(record.state) != "on_disk":
                held[record.key] = str(record.state)
                details[record.key] = {"last_used_at": record.last_used_at, "load_ms": record.load_ms,
                                       "rank": record.rank, "error": record.error}
            if record.pinned:
                pinned.append(record.key)
        in_flight += sum(runtime.requests_in_flight().values())
    return {"ready": tokenizers.warm_up.report()["ok"], "held": held, "pinned": pinned, "details": details,
            "in_flight": in_flight, "gauges": engine_gauges(engine) if engine is not None else {}}


@router.post("/internal/adapters/{adapter_id}/unpin")
def unpin(adapter_id: str, settings: SettingsDep, authorization: str | None = Header(default=None)) -> dict[str, Any]:
    check_internal_key(settings, authorization)
    return {"id": adapter_id, "was_pinned": unpin_everywhere(adapter_id)}


@router.post("/internal/adapters/{adapter_id}/drop")
def drop(adapter_id: str, settings: SettingsDep, authorization: str | None = Header(default=None)) -> dict[str, Any]:
    """A deleted adapter leaves this replica (when the requests using it end)."""
    from app.services.adapter_lifecycle import drop_everywhere

    check_internal_key(settings, authorization)
    drop_everywhere([adapter_id])
    return {"id": adapter_id, "dropped": True}

