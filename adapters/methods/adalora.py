"""AdaLoRA: LoRA in SVD form whose rank budget is reallocated to the layers that need it.

PEFT's AdaLoRA silently does nothing unless update_and_allocate() is called after every optimiser
step, and it needs total_step up front; both are handled here, not left to the caller.
"""

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
from adapters.methods.lora import check_lora_family, lora_family_defaults

DEFAULT_INIT_R = 12


class AdaLoraHyperparameters(TrainingHyperparameters):
    init_r: int | Auto | None = Field(default=None, description="starting rank of every module")
    target_r: int | Auto | None = Field(default=None, description="average rank after budget pruning")
    lora_alpha: float | Auto | None = None
    lora_dropout: float | Auto | None = None
    target_modules: list[str] | Auto | None = None


@register
class AdaLora(AdapterMethod):
    name = "adalora"
    peft_type = "ADALORA"
    hyperparameters = AdaLoraHyperparameters
    default_learning_rate = 2e-3

    def check(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        check_range("init_r", hp.init_r, 1, settings.max_lora_rank)
        check_range("target_r", hp.target_r, 1, settings.max_lora_rank)
        check_lora_family(hp, settings, base_info)
        init_r = hp.init_r if given(hp.init_r) else DEFAULT_INIT_R
        if given(hp.target_r) and hp.target_r > init_r:
            raise HyperparameterError("target_r", f"target_r ({hp.target_r}) must not exceed init_r ({init_r}"
                                                  f"{'' if given(hp.init_r) else ', the default'})")

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        init_r = hp.init_r if given(hp.init_r) else DEFAULT_INIT_R
        target_r = hp.target_r if given(hp.target_r) else max(1, min(8, init_r))
        return {"init_r": init_r, "target_r": target_r, **lora_family_defaults(hp, base_info, init_r)}

    def peft_config(self, hp: dict[str, Any], *, total_steps: int) -> Any:
        from peft import AdaLoraConfig, TaskType

        # Budget schedule: warm up on the full rank, prune during the middle, fine-tune at the end.
        tinit = total_steps // 10
        tfinal = total_steps // 5
        if total_steps - tinit - tfinal < 1:
            tinit, tfinal = 0, 0
        return AdaLoraConfig(task_type=TaskType.CAUSAL_LM, init_r=hp["init_r"], target_r=hp["target_r"],
                             lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                             target_modules=hp["target_modules"], total_step=total_steps,
                             tinit=tinit, tfinal=tfinal, deltaT=max(1, total_steps // 20))

    def after_optimizer_step(self, peft_model: Any, step: int) -> None:
        peft_model.base_model.update_and_allocate(step)
