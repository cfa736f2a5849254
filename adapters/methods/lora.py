"""LoRA: low-rank updates B·A added to the frozen projections (Hu et al., 2021)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters.methods.base import (
    AdapterMethod,
    Auto,
    HyperparameterError,
    TrainingHyperparameters,
    check_range,
    given,
    register,
)


class LoraHyperparameters(TrainingHyperparameters):
    r: int | Auto | None = Field(default=None, description="rank of the update (1 to max rank)")
    lora_alpha: float | Auto | None = Field(default=None, description="scaling numerator; scale = alpha / r")
    lora_dropout: float | Auto | None = Field(default=None, description="dropout on the LoRA path (0-0.9)")
    target_modules: list[str] | Auto | None = Field(default=None, description="projection names to adapt")


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


def lora_family_defaults(hp: Any, base_info: dict[str, Any], rank: int) -> dict[str, Any]:
    return {
        "lora_alpha": hp.lora_alpha if given(hp.lora_alpha) else 2 * rank,
        "lora_dropout": hp.lora_dropout if given(hp.lora_dropout) else 0.05,
        "target_modules": list(hp.target_modules) if given(hp.target_modules)
        else list(base_info["default_target_modules"]),
    }


def check_lora_family(hp: Any, settings: Any, base_info: dict[str, Any]) -> None:
    check_range("lora_alpha", hp.lora_alpha, 0, 4096, low_open=True)
    check_range("lora_dropout", hp.lora_dropout, 0, 0.9)
    check_target_modules(hp.target_modules, base_info)


@register
class Lora(AdapterMethod):
    name = "lora"
    peft_type = "LORA"
    hyperparameters = LoraHyperparameters
    default_learning_rate = 1e-3

    def check(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        check_range("r", hp.r, 1, settings.max_lora_rank)
        check_lora_family(hp, settings, base_info)

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        rank = hp.r if given(hp.r) else 8
        return {"r": rank, **lora_family_defaults(hp, base_info, rank)}

    def peft_config(self, hp: dict[str, Any], *, total_steps: int) -> Any:
        from peft import LoraConfig, TaskType

        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=hp["r"], lora_alpha=hp["lora_alpha"],
                          lora_dropout=hp["lora_dropout"], target_modules=hp["target_modules"], bias="none")
