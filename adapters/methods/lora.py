"""LoRA: low-rank updates B·A added to the frozen projections (Hu et al., 2021)."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from pydantic import Field

from adapters.methods.base import (
    AdapterMethod,
    Auto,
    HyperparameterError,
    NotInBaseModel,
    ResolvedHyperparameters,
    TrainingHyperparameters,
    bounded,
    given,
    is_module_name,
    register,
)
from adapters.methods.serving import AdapterLoadError, LoraFactors, ServingKind, ServingWeights

# Keys of an imported LoRA-family adapter_config.json that we keep (everything else is dropped).
LORA_CONFIG_KEYS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out",
                              "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "use_dora",
                              "init_lora_weights"})
# PEFT's saved tensor names start with this (the PeftModel wraps the base model's own module names).
PEFT_PREFIX = "base_model.model."


class LoraFamilyHyperparameters(TrainingHyperparameters):
    """What LoRA and AdaLoRA share."""

    lora_alpha: float | Auto | None = bounded("scaling numerator; scale = alpha / rank", 0, 4096, low_open=True)
    lora_dropout: float | Auto | None = bounded("dropout on the LoRA path", 0, 0.9)
    target_modules: list[str] | Auto | None = Field(default=None, description="projection names to adapt")


class LoraHyperparameters(LoraFamilyHyperparameters):
    r: int | Auto | None = bounded("rank of the update", 1, "max_lora_rank")


class ResolvedLoraFamily(ResolvedHyperparameters):
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str]


class ResolvedLora(ResolvedLoraFamily):
    r: int


def check_target_modules(value: Any, base_info: dict[str, Any]) -> None:
    if not given(value):
        return
    if not value:
        raise HyperparameterError("target_modules", "target_modules must name at least one module")
    available = set(base_info["linear_modules"])
    unknown = [m for m in value if m not in available]
    if unknown:
        raise HyperparameterError(
            "target_modules", f"target_modules {unknown} do not exist in the base model; "
                              f"available: {sorted(available)}")


def lora_family_defaults(hp: Any, base_info: dict[str, Any], rank: int, dropout: float) -> dict[str, Any]:
    return {
        "lora_alpha": hp.lora_alpha if given(hp.lora_alpha) else 2 * rank,
        "lora_dropout": hp.lora_dropout if given(hp.lora_dropout) else dropout,
        "target_modules": list(hp.target_modules) if given(hp.target_modules)
        else list(base_info["default_target_modules"]),
    }


def check_lora_family_config(config: dict[str, Any], *, rank_key: str, max_rank: int) -> None:
    """Admission checks shared by LoRA and AdaLoRA configs (raise AdapterLoadError saying what is accepted)."""
    rank = config.get(rank_key)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise AdapterLoadError(f"the adapter's rank {rank!r} must be an integer from 1 to {max_rank}")
    if config.get("modules_to_save"):
        raise AdapterLoadError("adapters with modules_to_save (full copies of base layers) are not accepted")
    if config.get("use_dora"):
        raise AdapterLoadError("DoRA adapters (use_dora=true) are not supported")


def pattern_modules(key: str, module_names: Collection[str]) -> list[str]:
    """The modules a pattern key names under PEFT's semantics (get_pattern_key: the module's name is the key or ends
    with "." + key), compared as strings."""
    return [m for m in module_names if m == key or m.endswith("." + key)]


def escaped(module: str) -> str:
    # A full module name written so that PEFT's regex over it (`(.*\.)?(key)$`) matches that module alone.
    return module.replace(".", "\\.")


def literal_patterns(field: str, patterns: Any, module_names: Collection[str], *, max_rank: int) -> dict[str, Any]:
    """alpha_pattern or rank_pattern of an imported LoRA with each key rewritten as the full names of the modules it
    names, escaped. PEFT compiles every key as a regular expression (get_pattern_key), so a key must be a module's
    name or a dotted tail of one, checked by string comparison; anything else is refused. Rewritten, PEFT's regex
    over a key means the one module it names, as the engine reads it (pattern_value). Where several keys name a
    module, the first wins, as in PEFT."""
    if not isinstance(patterns, dict):
        raise AdapterLoadError(f"adapter_config.json: {field} must be an object of module names to values")
    rewritten: dict[str, Any] = {}
    for key, value in patterns.items():
        named = pattern_modules(key, module_names) if is_module_name(key) else []
        if not named:
            raise NotInBaseModel(f"adapter_config.json: {field} key {key!r} names no module of the base model; keys "
                                 "must be module names or their suffixes, not regular expressions")
        if field == "rank_pattern":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= max_rank:
                raise AdapterLoadError(f"adapter_config.json: rank_pattern {key!r} is {value!r}; ranks must be "
                                       f"integers from 1 to {max_rank}")
        elif not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise AdapterLoadError(f"adapter_config.json: {field} {key!r} is {value!r}; a number is needed")
        for module in named:
            rewritten.setdefault(escaped(module), value)
    return rewritten


def stored_patterns(field: str, patterns: Any) -> dict[str, Any]:
    """A stored config's alpha_pattern or rank_pattern as module names (unescaped) to values, in PEFT's order. An
    import stores escaped full names (literal_patterns); a key that is anything else (a config stored before imports
    checked them) is refused rather than compiled or silently ignored."""
    if not patterns:
        return {}
    if not isinstance(patterns, dict):
        raise AdapterLoadError(f"{field} must be an object of module names to values")
    names: dict[str, Any] = {}
    for key, value in patterns.items():
        name = key.replace("\\.", ".") if isinstance(key, str) else key
        if not is_module_name(name):
            raise AdapterLoadError(f"{field} key {key!r} is not a module name; keys must be module names or their "
                                   "suffixes, not regular expressions")
        names.setdefault(name, value)
    return names


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A module's value from stored_patterns(): the first name that is the module's or a dotted tail of it (PEFT's
    get_pattern_key, by string comparison)."""
    for name, value in patterns.items():
        if module == name or module.endswith("." + name):
            return value
    return default


def low_rank_weights(factors: dict[str, LoraFactors], max_rank: int) -> ServingWeights:
    if not factors:
        raise AdapterLoadError("adapter has no LoRA weights")
    rank = max(f.a.shape[0] for f in factors.values())
    if rank > max_rank:
        raise AdapterLoadError(f"adapter rank {rank} exceeds the server's maximum of {max_rank}")
    return ServingWeights(kind=ServingKind.LOW_RANK, rank=rank, low_rank=factors)


@register
class Lora(AdapterMethod[ResolvedLora]):
    name = "lora"
    # OpenAI's method type for supervised fine-tuning: trains LoRA, the default method.
    aliases = ("supervised",)
    peft_type = "LORA"
    hyperparameters = LoraHyperparameters
    resolved = ResolvedLora
    default_learning_rate = 1e-3
    serving_kind = ServingKind.LOW_RANK
    config_keys = LORA_CONFIG_KEYS

    def check(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        check_target_modules(hp.target_modules, base_info)

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        rank = hp.r if given(hp.r) else 8
        # No dropout by default (PEFT's default too): on the shipped task it learned as well as 0.05
        # (bench/results/defaults.md), and its random masks were a quarter of a bf16 training step on CPU.
        return {"r": rank, **lora_family_defaults(hp, base_info, rank, dropout=0.0)}

    def peft_config(self, hp: ResolvedLora, *, total_steps: int, base_model_path: str | None = None) -> Any:
        from peft import LoraConfig, TaskType

        # PEFT annotates lora_alpha as int; a float is what it computes with (scale = alpha / r), and what we accept.
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=hp.r, lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]
                          lora_dropout=hp.lora_dropout, target_modules=hp.target_modules, bias="none")

    def sanitise_config(self, config: dict[str, Any], *, max_rank: int,
                        module_names: Collection[str]) -> dict[str, Any]:
        check_lora_family_config(config, rank_key="r", max_rank=max_rank)
        kept = super().sanitise_config(config, max_rank=max_rank, module_names=module_names)
        for field in ("alpha_pattern", "rank_pattern"):
            if kept.get(field):
                kept[field] = literal_patterns(field, kept[field], module_names, max_rank=max_rank)
        return kept

    def serving_weights(self, config: dict[str, Any], weights: dict[str, Any], *, model_config: Any,
                        max_rank: int) -> ServingWeights:
        if config.get("use_dora"):
            raise AdapterLoadError("DoRA adapters (use_dora=true) are not supported")
        factors: dict[str, LoraFactors] = {}
        alpha_pattern = stored_patterns("alpha_pattern", config.get("alpha_pattern"))
        for name, a in weights.items():
            if not name.endswith(".lora_A.weight"):
                continue
            module = name[: -len(".lora_A.weight")].removeprefix(PEFT_PREFIX)
            b = weights.get(name.replace(".lora_A.weight", ".lora_B.weight"))
            if b is None:
                raise AdapterLoadError(f"{module}: lora_A has no matching lora_B")
            rank = a.shape[0]
            if b.shape[1] != rank:
                raise AdapterLoadError(f"{module}: lora_A rank {rank} does not match lora_B {tuple(b.shape)}")
            alpha = pattern_value(alpha_pattern, module, config.get("lora_alpha", 8))
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            factors[module] = LoraFactors(a=a.float().contiguous(), b=b.float().contiguous(), scale=float(scale))
        return low_rank_weights(factors, max_rank)
