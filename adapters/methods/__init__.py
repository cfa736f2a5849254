"""Fine-tuning methods, one module each, registered in METHODS (see base.py for what a method declares)."""

from adapters.methods import adalora, ia3, lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (registration)
from adapters.methods.base import (
    METHODS,
    AdapterMethod,
    DuplicateMethodError,
    HyperparameterError,
    TrainingHyperparameters,
    accepted_names,
    for_config,
    method_for_peft_type,
    method_named,
    register,
    total_steps,
)
from adapters.methods.serving import (
    AdapterLoadError,
    ChannelScale,
    LoraFactors,
    ServingKind,
    ServingWeights,
)

DEFAULT_METHOD = "lora"

__all__ = ["DEFAULT_METHOD", "METHODS", "AdapterLoadError", "AdapterMethod", "ChannelScale", "DuplicateMethodError",
           "HyperparameterError", "LoraFactors", "ServingKind", "ServingWeights", "accepted_names", "for_config",
           "method_for_peft_type", "method_named", "register", "total_steps", "TrainingHyperparameters"]
