"""IA³: learned per-channel scaling of the keys, the values and the feed-forward input (Liu et al., 2022).

Served from adapter slots like LoRA, without merging into the base weights: each row of a batch
multiplies the targeted projections' outputs (keys, values) or inputs (feed-forward) by its adapter's
vectors, and rows of other adapters by ones.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import Field

from adapters.methods.base import (
    AdapterMethod,
    Auto,
    HyperparameterError,
    ResolvedHyperparameters,
    TrainingHyperparameters,
    given,
    register,
)
from adapters.methods.lora import PEFT_PREFIX, check_target_modules
from adapters.methods.serving import AdapterLoadError, ChannelScale, ServingKind, ServingWeights

# Llama's defaults (keys and values, and the input of the feed-forward down projection), for a base_info that does
# not name its family's (adapters/families.py: each family's keys, values and MLP input).
DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
DEFAULT_FEEDFORWARD = ("down_proj",)


class IA3Hyperparameters(TrainingHyperparameters):
    target_modules: list[str] | Auto | None = Field(default=None, description="projections to scale")
    feedforward_modules: list[str] | Auto | None = Field(
        default=None, description="the targets whose input (not output) is scaled; a subset of target_modules")


class ResolvedIA3(ResolvedHyperparameters):
    target_modules: list[str]
    feedforward_modules: list[str]


@register
class IA3(AdapterMethod[ResolvedIA3]):
    name = "ia3"
    peft_type = "IA3"
    hyperparameters = IA3Hyperparameters
    resolved = ResolvedIA3
    # One vector per projection starting at ones: it takes large steps to move.
    default_learning_rate = 1e-2
    serving_kind = ServingKind.SCALING
    config_keys = frozenset({"target_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights",
                             "modules_to_save"})

    def check(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        check_target_modules(hp.target_modules, base_info)
        targets = hp.target_modules if given(hp.target_modules) else self._default_targets(base_info)
        if given(hp.feedforward_modules):
            outside = [m for m in hp.feedforward_modules if m not in targets]
            if outside:
                raise HyperparameterError("feedforward_modules", f"feedforward_modules {outside} are not in "
                                                                 f"target_modules {list(targets)}")

    @staticmethod
    def _default_targets(base_info: dict[str, Any]) -> list[str]:
        wanted = base_info.get("scaled_modules", DEFAULT_TARGETS)
        present = [m for m in wanted if m in base_info["linear_modules"]]
        if not present:
            raise HyperparameterError("target_modules", f"the base model has none of IA³'s default targets "
                                                        f"{list(wanted)}; set target_modules")
        return present

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        targets = list(hp.target_modules) if given(hp.target_modules) else self._default_targets(base_info)
        feedforward = list(hp.feedforward_modules) if given(hp.feedforward_modules) else \
            [m for m in base_info.get("scaled_input_modules", DEFAULT_FEEDFORWARD) if m in targets]
        return {"target_modules": targets, "feedforward_modules": feedforward}

    def peft_config(self, hp: ResolvedIA3, *, total_steps: int, base_model_path: str | None = None) -> Any:
        from peft import IA3Config, TaskType

        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=hp.target_modules,
                         feedforward_modules=hp.feedforward_modules)

    def sanitise_config(self, config: dict[str, Any], *, max_rank: int,
                        module_names: Collection[str]) -> dict[str, Any]:
        if config.get("modules_to_save"):
            raise AdapterLoadError("adapters with modules_to_save (full copies of base layers) are not accepted")
        return super().sanitise_config(config, max_rank=max_rank, module_names=module_names)

    def serving_weights(self, config: dict[str, Any], weights: dict[str, Any], *, model_config: Any,
                        max_rank: int) -> ServingWeights:
        feedforward = config.get("feedforward_modules") or []
        if isinstance(feedforward, str):
            feedforward = [feedforward]
        scales: dict[str, ChannelScale] = {}
        for name, vector in weights.items():
            if not name.endswith(".ia3_l"):
                continue
            module = name[: -len(".ia3_l")].removeprefix(PEFT_PREFIX)
            # PEFT's matching: the module's name is the key or ends with "." + key (GPT-2's "mlp.c_proj").
            is_feedforward = any(module == key or module.endswith("." + key) for key in feedforward)
            # PEFT stores [1, in_features] for feed-forward targets and [out_features, 1] for the others.
            expected_row = vector.shape[0] == 1 if is_feedforward else vector.dim() == 2 and vector.shape[1] == 1
            if vector.dim() != 2 or not expected_row:
                raise AdapterLoadError(f"{module}: ia3_l has shape {tuple(vector.shape)}, which does not match its "
                                       f"{'feed-forward' if is_feedforward else 'output'} scaling")
            scales[module] = ChannelScale(vector=vector.float().flatten().contiguous(),
                                          side="input" if is_feedforward else "output")
        if not scales:
            raise AdapterLoadError("adapter has no IA³ vectors (ia3_l)")
        return ServingWeights(kind=ServingKind.SCALING, scales=scales)
