"""What every fine-tuning method provides, the shared training hyperparameters, and the registry.

A method is one module in this package: its hyperparameter schema, how it becomes a PEFT config,
and any hook the training loop must call. Adding a method means adding a module and registering it;
tests parametrise over `METHODS`, so every method gets every test.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]


class TrainingHyperparameters(BaseModel):
    """Hyperparameters every method shares. Each may be "auto" or omitted; resolve() fills them."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto | None = Field(default=None, description="passes over the training file (1-50)")
    batch_size: int | Auto | None = Field(default=None, description="examples per optimiser step (1-256)")
    learning_rate: float | Auto | None = Field(default=None, description="peak learning rate (0 < lr <= 1)")
    # OpenAI's knob: scales the method's default learning rate when learning_rate is not given.
    learning_rate_multiplier: float | Auto | None = Field(default=None, description="0 < m <= 100")
    max_steps: int | Auto | None = Field(default=None, description="optional cap on optimiser steps")
    max_seq_length: int | Auto | None = Field(default=None, description="tokens per example, longer ones are cut")
    warmup_ratio: float | Auto | None = Field(default=None, description="share of steps spent warming up (0-0.5)")
    weight_decay: float | Auto | None = Field(default=None, description="AdamW weight decay (0-1)")


class HyperparameterError(ValueError):
    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


def given(value: Any) -> bool:
    return value is not None and value != "auto"


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    if not given(value):
        return
    bad = value <= low if low_open else value < low
    if bad or value > high:
        opener = "(" if low_open else "["
        raise HyperparameterError(name, f"{name} must be in {opener}{low}, {high}], got {value}")


def auto_batch_size(n_examples: int) -> int:
    # Small datasets learn better from more, smaller steps; larger ones can afford bigger batches.
    if n_examples >= 256:
        return 8
    if n_examples >= 64:
        return 4
    if n_examples >= 16:
        return 2
    return 1


class AdapterMethod:
    """One PEFT method. Subclasses set the class attributes and implement peft_config()."""

    name: ClassVar[str]
    peft_type: ClassVar[str]
    hyperparameters: ClassVar[type[TrainingHyperparameters]] = TrainingHyperparameters
    default_learning_rate: ClassVar[float] = 1e-3
    # Whether the serving engine applies it as weight deltas (LoRA-like) or as a KV prefix.
    serving_kind: ClassVar[Literal["lora", "prefix"]] = "lora"

    def method_defaults(self, hp: TrainingHyperparameters, *, settings: Any, base_info: dict[str, Any]
                        ) -> dict[str, Any]:
        """The method's own resolved values (ranks, target modules, ...)."""
        return {}

    def check(self, hp: TrainingHyperparameters, *, settings: Any, base_info: dict[str, Any]) -> None:
        """Method-specific range checks; raise HyperparameterError naming the field."""

    def resolve(self, raw: dict[str, Any] | None, *, n_examples: int, settings: Any,
                base_info: dict[str, Any]) -> dict[str, Any]:
        """Validate client hyperparameters and return every value resolved (stored on the job)."""
        hp = self.hyperparameters.model_validate(raw or {})
        check_range("n_epochs", hp.n_epochs, 1, 50)
        check_range("batch_size", hp.batch_size, 1, 256)
        check_range("learning_rate", hp.learning_rate, 0, 1, low_open=True)
        check_range("learning_rate_multiplier", hp.learning_rate_multiplier, 0, 100, low_open=True)
        check_range("max_steps", hp.max_steps, 1, 1_000_000)
        check_range("max_seq_length", hp.max_seq_length, 16, settings.max_seq_length_limit)
        check_range("warmup_ratio", hp.warmup_ratio, 0, 0.5)
        check_range("weight_decay", hp.weight_decay, 0, 1)
        self.check(hp, settings=settings, base_info=base_info)
        multiplier = hp.learning_rate_multiplier if isinstance(hp.learning_rate_multiplier, float | int) else 1.0
        learning_rate = hp.learning_rate if given(hp.learning_rate) else self.default_learning_rate * multiplier
        resolved: dict[str, Any] = {
            "n_epochs": hp.n_epochs if given(hp.n_epochs) else 3,
            "batch_size": hp.batch_size if given(hp.batch_size) else auto_batch_size(n_examples),
            "learning_rate": learning_rate,
            "max_steps": hp.max_steps if given(hp.max_steps) else None,
            "max_seq_length": hp.max_seq_length if given(hp.max_seq_length)
            else min(1024, settings.max_seq_length_limit),
            "warmup_ratio": hp.warmup_ratio if given(hp.warmup_ratio) else 0.0,
            "weight_decay": hp.weight_decay if given(hp.weight_decay) else 0.0,
        }
        resolved.update(self.method_defaults(hp, settings=settings, base_info=base_info))
        return resolved

    def peft_config(self, hp: dict[str, Any], *, total_steps: int) -> Any:
        raise NotImplementedError

    def after_optimizer_step(self, peft_model: Any, step: int) -> None:
        """Called after every optimiser step, before gradients are zeroed (AdaLoRA needs this)."""


def total_steps(n_examples: int, hp: dict[str, Any]) -> int:
    steps = math.ceil(n_examples / hp["batch_size"]) * hp["n_epochs"]
    if hp.get("max_steps"):
        steps = min(steps, hp["max_steps"])
    return max(1, steps)


METHODS: dict[str, AdapterMethod] = {}


def register(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    METHODS[cls.name] = cls()
    return cls
