"""Read a PEFT adapter folder (safetensors + JSON config only) into the weights the engine serves.

The config's peft_type picks the method from the registry; the method turns the tensors into
`ServingWeights` of its serving kind and checks them against the base model's config. The engine
never looks at a method name or a PEFT type.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from adapters.methods import AdapterLoadError, ServingKind, ServingWeights, for_config
from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS

__all__ = ["AdapterLoadError", "LoadedAdapter", "load_adapter"]


@dataclass
class LoadedAdapter:
    key: str
    method: str  # the registered method's name
    weights: ServingWeights
    load_ms: float = 0.0
    size_bytes: int = 0

    @property
    def kind(self) -> ServingKind:
        return self.weights.kind

    @property
    def rank(self) -> int:
        return self.weights.rank


def _read(folder: Path, device: torch.device | str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterLoadError(f"adapter folder must hold {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{ADAPTER_CONFIG} must be a JSON object")
    try:
        weights = load_file(str(weights_path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterLoadError(f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}") from exc
    return config, weights


def load_adapter(folder: Path, *, key: str, model_config: Any, max_rank: int,
                 device: torch.device | str = "cpu") -> LoadedAdapter:
    started = time.perf_counter()
    config, weights = _read(folder, device)
    method = for_config(config)
    served = method.serving_weights(config, weights, model_config=model_config, max_rank=max_rank)
    return LoadedAdapter(key=key, method=method.name, weights=served,
                         load_ms=(time.perf_counter() - started) * 1000,
                         size_bytes=sum(t.numel() * t.element_size() for t in weights.values()))
