"""Read a PEFT adapter folder (safetensors + JSON config only) into tensors the engine can serve.

LoRA factors are kept as they are; AdaLoRA's SVD triplets (P·Λ·Q) are folded into the same A/B form
with the scale PEFT applies, so both are served by one code path. Prefix tuning becomes per-layer
key/value tensors.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from adapters.engine.lora_layers import LoraFactors
from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS

SUPPORTED_PEFT_TYPES = ("LORA", "ADALORA", "PREFIX_TUNING")
_PREFIX = "base_model.model."


class AdapterLoadError(ValueError):
    """An adapter that cannot be served; the message says why."""


@dataclass
class LoadedAdapter:
    key: str
    peft_type: str
    kind: Literal["lora", "prefix"]
    rank: int
    lora: dict[str, LoraFactors] = field(default_factory=dict)
    # Prefix tuning: one (key, value) pair per layer, each [kv_heads, num_virtual_tokens, head_dim].
    prefix: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    num_virtual_tokens: int = 0
    load_ms: float = 0.0
    size_bytes: int = 0


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


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys against the end of the module name.
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _lora(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, LoraFactors]:
    if config.get("use_dora"):
        raise AdapterLoadError("DoRA adapters (use_dora=true) are not supported")
    factors: dict[str, LoraFactors] = {}
    for name, a in weights.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[: -len(".lora_A.weight")].removeprefix(_PREFIX)
        b = weights.get(name.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise AdapterLoadError(f"{module}: lora_A has no matching lora_B")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise AdapterLoadError(f"{module}: lora_A rank {rank} does not match lora_B {tuple(b.shape)}")
        alpha = _pattern_value(config.get("alpha_pattern", {}), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[module] = LoraFactors(a=a.float().contiguous(), b=b.float().contiguous(), scale=float(scale))
    return factors


def _adalora(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, LoraFactors]:
    factors: dict[str, LoraFactors] = {}
    # PEFT's SVD layer computes B·(A⊙E)·alpha/(ranknum+1e-5), where ranknum stays the initial rank.
    ranknum = float(config.get("init_r") or config.get("r") or 1)
    alpha = config.get("lora_alpha") or ranknum
    for name, a in weights.items():
        if not name.endswith(".lora_A"):
            continue
        module = name[: -len(".lora_A")].removeprefix(_PREFIX)
        b, e = weights.get(module_key(name, "lora_B")), weights.get(module_key(name, "lora_E"))
        if b is None or e is None:
            raise AdapterLoadError(f"{module}: AdaLoRA needs lora_A, lora_B and lora_E")
        if a.shape[0] == 0:  # the budget pruned this module to rank 0: it adds nothing
            continue
        folded_a = (a * e).float().contiguous()
        factors[module] = LoraFactors(a=folded_a, b=b.float().contiguous(), scale=float(alpha / (ranknum + 1e-5)))
    return factors


def module_key(name: str, suffix: str) -> str:
    return name.rsplit(".", 1)[0] + "." + suffix


def _prefix(config: dict[str, Any], weights: dict[str, torch.Tensor], model_config: Any
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    embeddings = weights.get("prompt_embeddings")
    if embeddings is None:
        raise AdapterLoadError("prefix-tuning adapter has no prompt_embeddings tensor")
    try:
        nvt, layers = int(config["num_virtual_tokens"]), int(config["num_layers"])
        heads, token_dim = int(config["num_attention_heads"]), int(config["token_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterLoadError(f"prefix-tuning config needs integer {exc}") from None
    if layers != model_config.num_hidden_layers:
        raise AdapterLoadError(f"prefix adapter was made for {layers} layers; the base model has "
                               f"{model_config.num_hidden_layers}")
    if embeddings.shape != (nvt, layers * 2 * token_dim):
        raise AdapterLoadError(f"prompt_embeddings has shape {tuple(embeddings.shape)}, expected "
                               f"({nvt}, {layers * 2 * token_dim})")
    head_dim = token_dim // heads
    # Same layout PEFT's get_prompt uses: [nvt, layers*2, heads, head_dim] → per layer K and V.
    kv = embeddings.float().view(nvt, layers * 2, heads, head_dim).permute(1, 2, 0, 3).contiguous()
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]


def load_adapter(folder: Path, *, key: str, model_config: Any, max_rank: int,
                 device: torch.device | str = "cpu") -> LoadedAdapter:
    started = time.perf_counter()
    config, weights = _read(folder, device)
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        supported = ", ".join(SUPPORTED_PEFT_TYPES)
        raise AdapterLoadError(f"peft_type {peft_type!r} is not supported; supported: {supported}")
    size = sum(t.numel() * t.element_size() for t in weights.values())
    if peft_type == "PREFIX_TUNING":
        prefix = _prefix(config, weights, model_config)
        return LoadedAdapter(key=key, peft_type=peft_type, kind="prefix", rank=0, prefix=prefix,
                             num_virtual_tokens=int(config["num_virtual_tokens"]),
                             load_ms=(time.perf_counter() - started) * 1000, size_bytes=size)
    factors = _lora(config, weights) if peft_type == "LORA" else _adalora(config, weights)
    if not factors:
        raise AdapterLoadError("adapter has no LoRA weights")
    rank = max(f.a.shape[0] for f in factors.values())
    if rank > max_rank:
        raise AdapterLoadError(f"adapter rank {rank} exceeds the server's maximum of {max_rank}")
    return LoadedAdapter(key=key, peft_type=peft_type, kind="lora", rank=rank, lora=factors,
                         load_ms=(time.perf_counter() - started) * 1000, size_bytes=size)
