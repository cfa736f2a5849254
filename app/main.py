"""create_app(): routers, error handlers and start-up (schema check, tokenizer warm-up, optional model preload)."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app import console, logs, metrics
from app.api import (
    adapters,
    admin,
    evaluations,
    files,
    fine_tuning,
    health,
    inference,
    internal,
    models,
    proxy,
    webhooks,
)
from app.db.session import SchemaOutOfDate, schema_problem
from app.errors import install_error_handlers
from app.services import tokenizers
from app.settings import get_settings

log = logging.getLogger("adaptery")

if get_settings().role == "api":
    # The API tier never loads torch. With its sys.modules entry set to None any import of it fails at once
    # (Python's rule), and transformers, finding no torch, keeps to tokenizers, which is all the API uses.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level)
    problem = schema_problem()
    if problem:
        log.critical(problem)
        raise SchemaOutOfDate(problem)
    bootstrap_tenant(settings)
    check_role(settings)
    tokenizers.start_warm_up(settings)  # off the request path; /ready says when it is done
    if settings.preload_inference and settings.role != "api":
        from app.services.inference import get_engine

        get_engine(settings).runtime(settings.default_base_model)
    if settings.role == "api":
        from app.services import routing

        await routing.start(settings)
    try:
        yield
    finally:
        if settings.role == "api":
            await routing.stop()


def check_role(settings: Any) -> None:
    """A split deployment needs its parts named: refuse to start without them, saying which setting."""
    missing = []
    if settings.role == "api" and not settings.inference_urls.strip():
        missing.append("ADAPTERY_INFERENCE_URLS (the inference replicas' base URLs, comma-separated)")
    if settings.role in ("api", "inference") and not settings.internal_key:
        missing.append("ADAPTERY_INTERNAL_KEY (a secret the API and the inference replicas share)")
    if missing:
        message = f"ADAPTERY_ROLE={settings.role} needs " + " and ".join(missing) + "."
        log.critical(message)
        raise RuntimeError(message)


def bootstrap_tenant(settings: Any) -> None:
    from app.db.session import session_scope
    from app.services.tenants import bootstrap

    with session_scope() as session:
        key = bootstrap(session, data_dir=settings.data_dir, explicit_key=settings.bootstrap_key)
    if key:
        log.warning("created the local tenant; its API key (also in %s): %s", settings.data_dir / "bootstrap_key",
                    key)


def create_app(role: str | None = None) -> FastAPI:
    """The app of one role (ADAPTERY_ROLE): "all" everything in one process; "api" everything but the serving
    engine, whose routes are forwarded to the inference replicas; "inference" the engine's routes alone."""
    role = role or get_settings().role
    app = FastAPI(title="Adaptery", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted parameter-efficient fine-tuning with an OpenAI-shaped API.")
    install_error_handlers(app)
    app.middleware("http")(metrics.record_http)
    app.middleware("http")(logs.record_request)  # added last, so it runs first: the id covers the rest
    routers = [health.router]
    if role in ("all", "api"):
        routers += [files.router, fine_tuning.router, fine_tuning.methods_router, evaluations.router]
    routers += [proxy.router] if role == "api" else [inference.router, adapters.engine_router]
    routers += [models.router, adapters.router]
    if role in ("all", "api"):
        routers += [webhooks.router, admin.router]
    if role == "inference":
        routers.append(internal.router)
    for router in routers:
        app.include_router(router)
    if role in ("all", "api"):
        console.mount(app)
    return app


app = create_app()
