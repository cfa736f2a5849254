"""create_app(): routers, error handlers and start-up (schema migration, optional model preload)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import adapters, files, fine_tuning, health, inference, models
from app.db.session import migrate_to_head
from app.errors import install_error_handlers
from app.settings import get_settings

log = logging.getLogger("adaptery")


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    migrate_to_head()
    if settings.preload_inference:
        from app.services.inference import get_engine

        get_engine(settings).runtime(settings.default_base_model)
    yield


def create_app() -> FastAPI:
    app = FastAPI(title="Adaptery", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted parameter-efficient fine-tuning with an OpenAI-shaped API.")
    install_error_handlers(app)
    for module in (health, files, fine_tuning, inference, models, adapters):
        app.include_router(module.router)
    return app


app = create_app()
