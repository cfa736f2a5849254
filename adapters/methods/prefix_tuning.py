"""Prefix tuning: trained key/value vectors prepended to every attention layer (Li & Liang, 2021)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters.methods.base import AdapterMethod, Auto, TrainingHyperparameters, check_range, given, register


class PrefixTuningHyperparameters(TrainingHyperparameters):
    num_virtual_tokens: int | Auto | None = Field(default=None, description="prefix length (1-256)")


@register
class PrefixTuning(AdapterMethod):
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    hyperparameters = PrefixTuningHyperparameters
    # Prefix vectors start from random values and need a larger step than LoRA's factors.
    default_learning_rate = 1e-2
    serving_kind = "prefix"

    def check(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        check_range("num_virtual_tokens", hp.num_virtual_tokens, 1, 256)

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        return {"num_virtual_tokens": hp.num_virtual_tokens if given(hp.num_virtual_tokens) else 16}

    def peft_config(self, hp: dict[str, Any], *, total_steps: int) -> Any:
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hp["num_virtual_tokens"])
