"""create_app(): routers, error handlers and start-up (schema check, tokenizer warm-up, optional model preload)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi_offline import FastAPIOffline

from app import console, logs, metrics
from app.api import (
    adapters,
    admin,
    aliases,
    evaluations,
    feedback,
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
from app.request_guard import RequestGuard
from app.services import tokenizers
from app.settings import get_settings

log = logging.getLogger("adaptery")

if get_settings().role == "api":
    # The API tier never loads torch. With its sys.modules entry set to None any import of it fails at once
    # (Python's rule), and transformers, finding no torch, keeps to tokenizers, which is all the API uses.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    # ... and would say so at import ("PyTorch was not found. Models won't be available"): expected here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
    check_declared_base_models(settings)
    tokenizers.start_warm_up(settings)  # off the request path; /ready says when it is done
    if settings.role != "api":
        # The engine's decode loop is a Python thread: between its torch calls it holds the GIL, and a request
        # thread waiting for it waits a whole switch interval each time (5 ms by default). A shorter interval keeps
        # every other tenant's requests answered promptly while the batch is busy (bench/noisy_neighbour.py).
        sys.setswitchinterval(SERVING_SWITCH_INTERVAL)
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


def check_declared_base_models(settings: Any) -> None:
    """ADAPTERY_BASE_MODELS is where those models are registered: refuse to start with one of a family the engine
    cannot serve, naming the model and what is missing, rather than answer its first chat with an error. Folders
    only (config.json, no weights read); a hub id not downloaded yet is checked by the worker that loads it."""
    import json
    from pathlib import Path

    from adapters.families import unsupported_reason

    for model_id, source in settings.base_models.items():
        config = Path(source) / "config.json"
        if not config.is_file():
            continue
        try:
            reason = unsupported_reason(json.loads(config.read_text()))
        except (OSError, ValueError) as exc:
            reason = f"its config.json cannot be read: {exc}"
        if reason:
            message = f"ADAPTERY_BASE_MODELS names {model_id!r} ({source}), which cannot be served: {reason}"
            log.critical(message)
            raise RuntimeError(message)


def bootstrap_tenant(settings: Any) -> None:
    from app.db.session import session_scope
    from app.services.tenants import bootstrap

    with session_scope() as session:
        key = bootstrap(session, data_dir=settings.data_dir, explicit_key=settings.bootstrap_key)
    if key:
        # The key itself stays out of the log (logs are collected and kept where keys should not be).
        log.warning("created the local tenant; its API key is in %s (readable by this user only)",
                    settings.data_dir / "bootstrap_key")


SERVING_SWITCH_INTERVAL = 0.001
DOCUMENTATION_PATHS = ("/docs", "/redoc")
# What the documentation pages may load: their own scripts and styles (and the inline start-up script FastAPI
# writes), nothing from another origin.
DOCUMENTATION_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                        "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'")


async def _documentation_policy(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    if request.url.path in DOCUMENTATION_PATHS:
        response.headers["Content-Security-Policy"] = DOCUMENTATION_POLICY
    return response


def create_app(role: str | None = None) -> FastAPI:
    """The app of one role (ADAPTERY_ROLE): "all" everything in one process; "api" everything but the serving
    engine, whose routes are forwarded to the inference replicas; "inference" the engine's routes alone."""
    role = role or get_settings().role
    # /docs and /redoc with their scripts served from here: the console keeps the key in this origin's storage,
    # so no script from elsewhere (a CDN) may run on it.
    app = FastAPIOffline(title="Adaptery", version="0.1.0", lifespan=lifespan, static_url="/docs-assets",
                         description="Self-hosted parameter-efficient fine-tuning with an OpenAI-shaped API.")
    install_error_handlers(app)
    # Added first, so it is the innermost: a body's size is counted in the `receive` the app itself calls (an
    # @app.middleware between them would relay it through a task, turning the refusal into a parse error). Inside
    # logging and metrics, so a refused request is logged and counted.
    app.add_middleware(RequestGuard)
    app.middleware("http")(_documentation_policy)
    app.middleware("http")(metrics.record_http)
    app.middleware("http")(logs.record_request)  # added last, so it runs first: the id covers the rest
    routers = [health.router]
    if role in ("all", "api"):
        routers += [files.router, fine_tuning.router, fine_tuning.methods_router, evaluations.router]
    routers += [proxy.router] if role == "api" else [inference.router, adapters.engine_router]
    routers += [models.router, adapters.router]
    if role in ("all", "api"):
        routers += [webhooks.router, admin.router, aliases.router, feedback.router]
    if role == "inference":
        routers.append(internal.router)
    for router in routers:
        app.include_router(router)
    if role in ("all", "api"):
        console.mount(app)
    return app


app = create_app()
