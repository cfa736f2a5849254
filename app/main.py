"""create_app(): routers, error handlers and start-up (schema check, tokenizer warm-up, optional model preload)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app import console, logs, metrics
from app.api import adapters, admin, evaluations, files, fine_tuning, health, inference, models, webhooks
from app.db.session import SchemaOutOfDate, schema_problem
from app.errors import install_error_handlers
from app.services import tokenizers
from app.settings import get_settings

log = logging.getLogger("adaptery")


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level)
    problem = schema_problem()
    if problem:
        log.critical(problem)
        raise SchemaOutOfDate(problem)
    bootstrap_tenant(settings)
    tokenizers.start_warm_up(settings)  # off the request path; /ready says when it is done
    if settings.preload_inference:
        from app.services.inference import get_engine

        get_engine(settings).runtime(settings.default_base_model)
    yield


def bootstrap_tenant(settings: Any) -> None:
    from app.db.session import session_scope
    from app.services.tenants import bootstrap

    with session_scope() as session:
        key = bootstrap(session, data_dir=settings.data_dir, explicit_key=settings.bootstrap_key)
    if key:
        log.warning("created the local tenant; its API key (also in %s): %s", settings.data_dir / "bootstrap_key",
                    key)


def create_app() -> FastAPI:
    app = FastAPI(title="Adaptery", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted parameter-efficient fine-tuning with an OpenAI-shaped API.")
    install_error_handlers(app)
    app.middleware("http")(metrics.record_http)
    app.middleware("http")(logs.record_request)  # added last, so it runs first: the id covers the rest
    for module in (health, files, fine_tuning, evaluations, inference, models, adapters, webhooks, admin):
        app.include_router(module.router)
    app.include_router(fine_tuning.methods_router)
    console.mount(app)
    return app


app = create_app()
