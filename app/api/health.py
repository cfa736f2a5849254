"""/metrics (Prometheus), /health (the process is up) and /ready (database, broker and a worker answer, and
the start-up warm-up is done). With ADAPTERY_METRICS_TOKEN set, /metrics needs it; /ready's error text is shown
only with that token or the admin key."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select, text

from app import metrics
from app.api.deps import SessionDep, SettingsDep
from app.db.models import WorkerHeartbeat
from app.errors import Unauthorized
from app.schemas.health import Health, Ready
from app.services import tokenizers

router = APIRouter(tags=["health"])
log = logging.getLogger("adaptery.health")
REDACTED = "failed (the reason is in the service log, or here with ADAPTERY_METRICS_TOKEN or the admin key)"
WORKER_FRESH_SECONDS = 30


@router.get("/metrics", response_class=Response, responses={200: {
    "content": {"text/plain": {"schema": {"type": "string"}}},
    "description": "Prometheus exposition text (adaptery_* metrics of every process of the service)"}})
def prometheus_metrics(request: Request, settings: SettingsDep) -> Response:
    if settings.metrics_token and not _is_operator(settings, request):
        raise Unauthorized("/metrics needs the scrape token (ADAPTERY_METRICS_TOKEN) as 'Authorization: Bearer "
                           "<token>'.", code="invalid_api_key")
    return metrics.render()


def _is_operator(settings: Any, request: Request) -> bool:
    """The scrape token or the admin key: who may read the service's internals (metrics, readiness errors). Read
    from the header here rather than declared as the API's security scheme: these routes are open by default."""
    authorization = request.headers.get("authorization", "")
    given = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    return bool(given) and any(secret and hmac.compare_digest(given.encode(), secret.encode())
                               for secret in (settings.metrics_token, settings.admin_key))


@router.get("/health", response_model=Health)
def health() -> dict[str, str]:
    return {"status": "ok"}


def _check_broker(url: str) -> str | None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return None
    except Exception as exc:  # any failure to connect means not ready
        return f"{type(exc).__name__}: {exc}"


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready, "description": "Not ready: see checks."}})
def ready(request: Request, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:  # reported, not raised: readiness is a report
        checks["database"] = {"ok": False, "error": str(exc)[:300]}
    if settings.role != "inference":  # an inference replica sends no jobs and needs no worker
        broker_error = _check_broker(settings.resolved_broker_url)
        checks["broker"] = {"ok": broker_error is None, **({"error": broker_error} if broker_error else {})}
        try:
            newest = session.scalar(select(func.max(WorkerHeartbeat.last_seen)))
            age = time.time() - newest if newest else None
            checks["worker"] = {"ok": age is not None and age < WORKER_FRESH_SECONDS,
                                "last_heartbeat_seconds_ago": round(age, 1) if age is not None else None}
        except Exception as exc:  # reported, not raised
            checks["worker"] = {"ok": False, "error": str(exc)[:300]}
    if settings.role == "api":
        from app.services import routing

        checks["inference"] = routing.get_router().report()
    checks["warm_up"] = tokenizers.warm_up.report()
    ok = all(c["ok"] for c in checks.values())
    if not _is_operator(settings, request):
        # Error text names hosts, users and versions: logged for the operator, not handed to anyone who asks.
        for name, check in checks.items():
            if "error" in check:
                log.warning("not ready: %s: %s", name, check["error"])
                check["error"] = REDACTED
    return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)
