"""Fine-tuning methods, one module each, registered by name in METHODS."""

from adapters.methods import adalora, lora, prefix_tuning  # noqa: F401  (registration)
from adapters.methods.base import METHODS, AdapterMethod, HyperparameterError, total_steps

DEFAULT_METHOD = "lora"

__all__ = ["DEFAULT_METHOD", "METHODS", "AdapterMethod", "HyperparameterError", "total_steps"]
