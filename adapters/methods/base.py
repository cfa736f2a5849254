"""What every fine-tuning method declares, the shared training hyperparameters, and the registry.

A method is one module in this package and declares everything about itself: the names accepted in
`method.type`, its PEFT type, hyperparameter schema and `auto` defaults, PEFT config, training hooks,
which config keys an imported adapter may carry, its admission checks, and how the serving engine
applies it (its serving kind and weights). Nothing outside this package branches on a method name or
a PEFT type: the API, the worker, the import gate and the engine ask the registry. Registering a name,
alias or PEFT type twice is an error at import time. Tests parametrise over `METHODS`, so every
method gets every test.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from adapters.methods.serving import AdapterLoadError, ServingKind, ServingWeights

Auto = Literal["auto"]
Scheduler = Literal["linear", "cosine", "constant"]
# What a job trains for: the supervised next-token loss; a preference objective on pairs: DPO (against the base
# model as the reference), or the reference-free ORPO and SimPO; or KTO on single answers marked good or bad.
Objective = Literal["supervised", "dpo", "orpo", "simpo", "kto"]
PAIR_OBJECTIVES = ("dpo", "orpo", "simpo")
PREFERENCE_OBJECTIVES = (*PAIR_OBJECTIVES, "kto")  # every objective with a beta
# The file format each objective trains on (the supervised one: any of the supervised formats).
OBJECTIVE_FORMATS = {"dpo": "preference", "orpo": "preference", "simpo": "preference", "kto": "feedback"}
# Each objective's beta when none is given: DPO's, ORPO's (λ) and KTO's from their papers and TRL; SimPO's from its
# paper.
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
DEFAULT_SIMPO_GAMMA = 1.0


def bounded(description: str, low: float, high: float | str, *, low_open: bool = False) -> Any:
    """A hyperparameter field whose accepted range is declared in its schema: resolve() checks it and
    GET /v1/fine_tuning/methods publishes it, so the form and the check cannot disagree. `high` may name a
    Settings attribute (a limit the operator sets)."""
    return Field(default=None, description=description,
                 json_schema_extra={"x-range": {"low": low, "high": high, "low_open": low_open}})


def declared_range(field: Any, settings: Any) -> tuple[float, float, bool] | None:
    """(low, high, low_open) of a field made with bounded(), its settings-named high read from `settings`."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    declared = extra.get("x-range")
    if not isinstance(declared, dict):
        return None
    high = declared["high"]
    return declared["low"], getattr(settings, high) if isinstance(high, str) else high, bool(declared["low_open"])


class TrainingHyperparameters(BaseModel):
    """Hyperparameters every method shares. Each may be "auto" or omitted; resolve() fills them."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto | None = bounded("passes over the training file", 1, 50)
    batch_size: int | Auto | None = bounded("examples per optimiser step", 1, 256)
    learning_rate: float | Auto | None = bounded("peak learning rate", 0, 1, low_open=True)
    # OpenAI's knob: scales the method's default learning rate when learning_rate is not given.
    learning_rate_multiplier: float | Auto | None = bounded(
        "scales the method's default learning rate when learning_rate is not given", 0, 100, low_open=True)
    max_steps: int | Auto | None = bounded("optional cap on optimiser steps", 1, 1_000_000)
    max_seq_length: int | Auto | None = bounded("tokens per example, longer ones are cut", 16,
                                                "max_seq_length_limit")
    warmup_ratio: float | Auto | None = bounded("share of steps spent warming up", 0, 0.5)
    weight_decay: float | Auto | None = bounded("AdamW weight decay", 0, 1)
    lr_scheduler: Scheduler | Auto | None = Field(
        default=None, description="how the learning rate falls after warmup: linear (default), cosine or constant")
    early_stopping_patience: int | Auto | None = bounded(
        "stop after this many validations without a lower validation loss and keep the best checkpoint as the "
        "fine-tuned model; needs a validation_file", 1, 100)
    gradient_checkpointing: bool | Auto | None = Field(
        default=None, description="recompute activations in the backward pass: less memory for long sequences, "
                                  "about a third more compute (default false)")
    objective: Objective | Auto | None = Field(
        default=None, description="what training optimises: supervised (the next-token loss on the answers; the "
                                  "default); on a file of preference pairs dpo (Direct Preference Optimisation "
                                  "against the base model as the reference; method.type 'dpo' sets it), orpo (the "
                                  "preferred answers' loss plus an odds-ratio term; no reference) or simpo (length-"
                                  "normalised log-probabilities with a target margin; no reference); on a feedback "
                                  "file (answers marked good or bad) kto (Kahneman-Tversky Optimisation, against the "
                                  "base model)")
    beta: float | Auto | None = bounded(
        "preference objectives: dpo and kto, how strongly the model is held to the reference (default 0.1); orpo, "
        "the odds-ratio term's weight λ (default 0.1); simpo, the reward scale (default 2.0)", 0, 10, low_open=True)
    gamma: float | Auto | None = bounded("simpo: the target reward margin γ (default 1.0)", 0, 10)


class ResolvedHyperparameters(BaseModel):
    """The shared hyperparameters with every value decided: what a job stores and its worker trains with.
    Each method extends it with its own resolved fields (the request-side models above accept "auto" and
    omissions; these hold the values resolve() chose)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_epochs: int
    batch_size: int
    learning_rate: float
    max_steps: int | None
    max_seq_length: int
    warmup_ratio: float
    weight_decay: float
    lr_scheduler: Scheduler
    early_stopping_patience: int | None
    gradient_checkpointing: bool
    # Defaults, so a job stored before preference objectives existed reads as the supervised job it was.
    objective: Objective = "supervised"
    beta: float | None = None
    gamma: float | None = None

    def shape(self) -> dict[str, Any]:
        """The method's own values (rank, target modules, virtual tokens, ...): what an adapter trained further
        (`from_model`) must keep."""
        return {k: v for k, v in self.model_dump().items() if k not in ResolvedHyperparameters.model_fields}


Resolved = TypeVar("Resolved", bound=ResolvedHyperparameters)


class HyperparameterError(ValueError):
    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


def given(value: Any) -> bool:
    return value is not None and value != "auto"


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    if not given(value):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise HyperparameterError(name, f"{name} must be a finite number, got {value}")
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


def auto_epochs(n_examples: int) -> int:
    """OpenAI's rule for `n_epochs: auto`, so a file trains as long here as there: 3 epochs, more for a
    small file (until about 100 examples are trained, at most 25 epochs), fewer for a large one (about
    25,000 examples trained, at least 1 epoch)."""
    if n_examples * 3 < 100:
        return max(3, min(25, 100 // max(1, n_examples)))
    if n_examples * 3 > 25_000:
        return max(1, 25_000 // n_examples)
    return 3


# Keys every imported adapter config may carry, whatever its method.
COMMON_CONFIG_KEYS = frozenset({"peft_type", "task_type", "inference_mode"})
# The characters of a module name as a config may give it. None repeats, groups or alternates, so PEFT's regex over
# such a name (it compiles names given as pattern keys) runs in time linear in the module name.
MODULE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")
# PEFT's shorthand for every linear layer but the output head: a keyword it expands, not a regular expression.
ALL_LINEAR = "all-linear"


class NotInBaseModel(AdapterLoadError):
    """An imported config names something that is no module of the base model (the import answers 422)."""


def is_module_name(value: Any) -> bool:
    """A plain dotted name: no regex syntax but the dots, no empty part."""
    return isinstance(value, str) and bool(value) and set(value) <= MODULE_NAME_CHARS and "" not in value.split(".")


def literal_module_list(field: str, value: Any, module_names: Collection[str]) -> Any:
    """target_modules or feedforward_modules as PEFT may safely read it. PEFT compares a list's entries with module
    names as strings, but runs a string as a regular expression (re.fullmatch) against every module name: a string
    is kept only when it is a module's full name (then as a one-entry list, which PEFT reads as the same module) or
    PEFT's all-linear keyword, and refused otherwise; a tenant's regex is never run."""
    if value is None or value == ALL_LINEAR:
        return value
    if isinstance(value, str):
        if not is_module_name(value) or value not in module_names:
            raise NotInBaseModel(f"adapter_config.json: {field} {value!r} is not the name of a module of the base "
                                 f"model; give {field} as a list of module names (e.g. [\"q_proj\", \"v_proj\"]), "
                                 "not regular expressions")
        return [value]
    if not isinstance(value, list | tuple | set | frozenset) or not all(isinstance(v, str) for v in value):
        raise AdapterLoadError(f"adapter_config.json: {field} must be a list of module names")
    return sorted(value) if isinstance(value, set | frozenset) else list(value)  # a set: PEFT's own, in memory


class AdapterMethod(Generic[Resolved]):
    """One PEFT method. Subclasses set the class attributes and implement peft_config() and serving_weights();
    `Resolved` is the method's typed resolved hyperparameters (its `resolved` class)."""

    name: ClassVar[str]
    # Other names accepted in method.type for this method.
    aliases: ClassVar[tuple[str, ...]] = ()
    peft_type: ClassVar[str]
    # What a request may send (values or "auto"), and what resolve() makes of it.
    hyperparameters: ClassVar[type[TrainingHyperparameters]] = TrainingHyperparameters
    resolved: type[Resolved]
    default_learning_rate: ClassVar[float] = 1e-3
    serving_kind: ClassVar[ServingKind]
    # Hyperparameters that resolve to None when not given (they switch something on); max_steps for all.
    optional_hyperparameters: ClassVar[frozenset[str]] = frozenset()
    # adapter_config.json keys an imported adapter may carry (besides COMMON_CONFIG_KEYS); the rest is dropped.
    config_keys: ClassVar[frozenset[str]] = frozenset()
    # Whether several examples may share one training row (packing): false for methods that put something in
    # front of each example's input, which a packed row would give to its first example only.
    packs_examples: ClassVar[bool] = True

    def learning_rate_default(self, hp: TrainingHyperparameters) -> float:
        """The learning rate a job gets when it gives none (before learning_rate_multiplier)."""
        return self.default_learning_rate

    def method_defaults(self, hp: TrainingHyperparameters, *, settings: Any, base_info: dict[str, Any]
                        ) -> dict[str, Any]:
        """The method's own resolved values (ranks, target modules, ...)."""
        return {}

    def check(self, hp: TrainingHyperparameters, *, settings: Any, base_info: dict[str, Any]) -> None:
        """Method-specific range checks; raise HyperparameterError naming the field."""

    def resolve(self, raw: dict[str, Any] | None, *, n_examples: int, settings: Any,
                base_info: dict[str, Any]) -> Resolved:
        """Validate client hyperparameters and return every value resolved (stored on the job)."""
        hp = self.hyperparameters.model_validate(raw or {})
        for name, field in type(hp).model_fields.items():
            limits = declared_range(field, settings)
            if limits is not None:
                check_range(name, getattr(hp, name), limits[0], limits[1], low_open=limits[2])
        self.check(hp, settings=settings, base_info=base_info)
        multiplier = hp.learning_rate_multiplier if isinstance(hp.learning_rate_multiplier, float | int) else 1.0
        learning_rate = hp.learning_rate if given(hp.learning_rate) else self.learning_rate_default(hp) * multiplier
        resolved: dict[str, Any] = {
            "n_epochs": hp.n_epochs if given(hp.n_epochs) else auto_epochs(n_examples),
            "batch_size": hp.batch_size if given(hp.batch_size) else auto_batch_size(n_examples),
            "learning_rate": learning_rate,
            "max_steps": hp.max_steps if given(hp.max_steps) else None,
            "max_seq_length": hp.max_seq_length if given(hp.max_seq_length)
            else min(1024, settings.max_seq_length_limit),
            "warmup_ratio": hp.warmup_ratio if given(hp.warmup_ratio) else 0.0,
            "weight_decay": hp.weight_decay if given(hp.weight_decay) else 0.0,
            "lr_scheduler": hp.lr_scheduler if given(hp.lr_scheduler) else "linear",
            "early_stopping_patience": hp.early_stopping_patience if given(hp.early_stopping_patience) else None,
            "gradient_checkpointing": bool(hp.gradient_checkpointing) if given(hp.gradient_checkpointing) else False,
            **self._objective(hp),
        }
        if resolved["objective"] == "kto" and resolved["batch_size"] < 2:
            # KTO's reference point is the batch's mean log-ratio on other examples' answers: one example has none.
            if given(hp.batch_size):
                raise HyperparameterError("batch_size", "the kto objective needs a batch_size of at least 2")
            resolved["batch_size"] = 2
        resolved.update(self.method_defaults(hp, settings=settings, base_info=base_info))
        return self.resolved.model_validate(resolved)

    @staticmethod
    def _objective(hp: TrainingHyperparameters) -> dict[str, Any]:
        objective = hp.objective if given(hp.objective) else "supervised"
        if objective != "simpo" and given(hp.gamma):
            raise HyperparameterError("gamma", "gamma applies to the simpo objective only")
        if objective not in PREFERENCE_OBJECTIVES:
            if given(hp.beta):
                raise HyperparameterError("beta", "beta applies to the preference objectives only (dpo, orpo, "
                                                  "simpo, kto; method.type 'dpo' sets dpo)")
            return {"objective": objective, "beta": None, "gamma": None}
        gamma = (hp.gamma if given(hp.gamma) else DEFAULT_SIMPO_GAMMA) if objective == "simpo" else None
        return {"objective": objective, "beta": hp.beta if given(hp.beta) else DEFAULT_BETA[objective],
                "gamma": gamma}

    def stored(self, values: dict[str, Any]) -> Resolved:
        """Resolved hyperparameters as a job stored them (`resolve(...).model_dump()`)."""
        return self.resolved.model_validate(values)

    def hyperparameter_schema(self, settings: Any) -> dict[str, Any]:
        """The JSON schema of this method's hyperparameters, with every declared range as minimum /
        maximum (exclusiveMinimum where the low end is open) and the operator's limits filled in."""
        schema = self.hyperparameters.model_json_schema()
        for name, field in self.hyperparameters.model_fields.items():
            prop = schema["properties"][name]
            prop.pop("x-range", None)
            limits = declared_range(field, settings)
            if limits is not None:
                low, high, low_open = limits
                prop["exclusiveMinimum" if low_open else "minimum"] = low
                prop["maximum"] = high
        return schema

    def peft_config(self, hp: Resolved, *, total_steps: int, base_model_path: str | None = None) -> Any:
        """The PEFT config to train with (`base_model_path`: where the base model's tokenizer can be read)."""
        raise NotImplementedError

    def saved_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The adapter_config.json to store for a trained adapter (PEFT's, cleaned of what must not travel)."""
        return config

    def continues_from_saved_adapter(self, hp: Resolved) -> bool:
        """Whether a new job can start from an adapter trained with `hp` (`from_model`): false where the saved
        adapter is less than training needs (a prompt encoder's output, not the encoder)."""
        return True

    def before_training(self, peft_model: Any, compute_dtype: str) -> None:
        """Called once on the new PEFT model before its first step, with the dtype training computes in."""

    def adapter_to_continue(self, tensors: dict[str, Any], saved_config: dict[str, Any]) -> dict[str, Any]:
        """A saved adapter's tensors (adapter_model.safetensors, with its adapter_config.json) in the shapes a new
        model of this method holds, for a job that continues it (`from_model`)."""
        return tensors

    def after_loading_checkpoint(self, peft_model: Any, saved_config: dict[str, Any]) -> None:
        """Called after a checkpoint's weights are loaded into `peft_model`, with its saved adapter_config.json: what
        training keeps in the config rather than in weights comes back from there."""

    def after_optimizer_step(self, peft_model: Any, step: int) -> None:
        """Called after every optimiser step, before gradients are zeroed (AdaLoRA needs this)."""

    def regularisation(self, peft_model: Any) -> Any:
        """A term PEFT adds to the training loss for this method (a tensor), or None."""
        return None

    def input_offset(self, hp: Resolved) -> int:
        """Positions the method puts in front of each example's input tokens (virtual tokens)."""
        return 0

    def saved_input_offset(self, config: dict[str, Any]) -> int:
        """input_offset() of an adapter as saved, read from its adapter_config.json."""
        return 0

    # ---------------------------------------------------------------- adapters as files

    def sanitise_config(self, config: dict[str, Any], *, max_rank: int,
                        module_names: Collection[str]) -> dict[str, Any]:
        """An imported config reduced to the whitelisted keys, after the method's admission checks (raise
        AdapterLoadError saying what is accepted; NotInBaseModel for what names no module of the base model).
        `module_names`: the base model's module names (named_modules()). Whatever PEFT reads as a regular
        expression is kept only as literal module names and is checked here by string comparison, never by
        compiling it: a catastrophic-backtracking pattern would hold the GIL for minutes, in the engine or in PEFT
        on a worker."""
        kept = {k: v for k, v in config.items() if k in COMMON_CONFIG_KEYS | self.config_keys}
        for field in ("target_modules", "feedforward_modules"):
            if field in kept:
                kept[field] = literal_module_list(field, kept[field], module_names)
        return kept

    def serving_weights(self, config: dict[str, Any], weights: dict[str, Any], *, model_config: Any,
                        max_rank: int) -> ServingWeights:
        """The saved adapter (config + tensors) in the form the engine applies, checked against the base
        model's config; raise AdapterLoadError naming what does not fit."""
        raise NotImplementedError


def total_steps(n_examples: int, hp: ResolvedHyperparameters) -> int:
    steps = math.ceil(n_examples / hp.batch_size) * hp.n_epochs
    if hp.max_steps:
        steps = min(steps, hp.max_steps)
    return max(1, steps)


class DuplicateMethodError(ValueError):
    pass


# Canonical name → method, in registration order.
METHODS: dict[str, AdapterMethod[Any]] = {}
_BY_NAME: dict[str, AdapterMethod[Any]] = {}  # names and aliases
_BY_PEFT_TYPE: dict[str, AdapterMethod[Any]] = {}

Method = TypeVar("Method", bound=type[AdapterMethod[Any]])


def register(cls: Method) -> Method:
    """Add a method to the registry; a name, alias or PEFT type that is already taken is an error."""
    method = cls()
    for name in (cls.name, *cls.aliases):
        if name in _BY_NAME:
            raise DuplicateMethodError(f"method name {name!r} of {cls.__name__} is already registered by "
                                       f"{type(_BY_NAME[name]).__name__}")
    if cls.peft_type in _BY_PEFT_TYPE:
        raise DuplicateMethodError(f"PEFT type {cls.peft_type!r} of {cls.__name__} is already registered by "
                                   f"{type(_BY_PEFT_TYPE[cls.peft_type]).__name__}")
    METHODS[cls.name] = method
    _BY_PEFT_TYPE[cls.peft_type] = method
    for name in (cls.name, *cls.aliases):
        _BY_NAME[name] = method
    return cls


def method_named(name: str) -> AdapterMethod[Any] | None:
    """The method a client names in method.type (its name or an alias)."""
    return _BY_NAME.get(name)


def method_for_peft_type(peft_type: Any) -> AdapterMethod[Any] | None:
    """The method that serves adapters of this PEFT type (from an adapter_config.json)."""
    return _BY_PEFT_TYPE.get(peft_type) if isinstance(peft_type, str) else None


def accepted_names() -> list[str]:
    return list(_BY_NAME)


def for_config(config: dict[str, Any]) -> AdapterMethod[Any]:
    """The method of a saved adapter's config, or AdapterLoadError listing the PEFT types accepted."""
    method = method_for_peft_type(config.get("peft_type"))
    if method is None:
        raise AdapterLoadError(f"peft_type {config.get('peft_type')!r} is not supported; supported: "
                               f"{', '.join(_BY_PEFT_TYPE)}")
    return method
