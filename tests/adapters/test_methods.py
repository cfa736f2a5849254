"""Fine-tuning methods: hyperparameter resolution and checks, PEFT configs, and AdaLoRA's rank reallocation.

Every generic test is parametrised over the METHODS registry, so a newly registered method gets them all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.methods import (
    DEFAULT_METHOD,
    METHODS,
    AdapterMethod,
    DuplicateMethodError,
    HyperparameterError,
    ServingKind,
    method_for_peft_type,
    method_named,
    register,
    total_steps,
)
from adapters.methods.base import ResolvedHyperparameters, TrainingHyperparameters, auto_batch_size
from app.settings import Settings

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Defaults deliberately a strict subset of the linear modules, so using the wrong list is caught.
BASE_INFO: dict[str, Any] = {"linear_modules": LLAMA_MODULES, "default_target_modules": ["q_proj", "v_proj"]}
COMMON_FIELDS = set(TrainingHyperparameters.model_fields)
ALL_METHODS = sorted(METHODS)
LORA_FAMILY = [name for name in ALL_METHODS if METHODS[name].serving_kind is ServingKind.LOW_RANK]
TARGETED = [name for name in ALL_METHODS if "target_modules" in METHODS[name].hyperparameters.model_fields]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices: one thread is as fast and far steadier on a busy machine than several spinning ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def method(name: str) -> AdapterMethod:
    return METHODS[name]


def resolved(name: str, raw: dict[str, Any] | None = None, *, n_examples: int = 100,
             settings: Settings | None = None) -> ResolvedHyperparameters:
    return method(name).resolve(raw, n_examples=n_examples, settings=settings or Settings(), base_info=BASE_INFO)


def resolve(name: str, raw: dict[str, Any] | None = None, *, n_examples: int = 100,
            settings: Settings | None = None) -> dict[str, Any]:
    """The resolved values as a job stores them."""
    return resolved(name, raw, n_examples=n_examples, settings=settings).model_dump()


def own_fields(name: str) -> set[str]:
    return set(method(name).hyperparameters.model_fields) - COMMON_FIELDS


def test_registry_has_the_shipped_methods() -> None:
    assert {"lora", "adalora", "prefix_tuning", "prompt_tuning", "p_tuning", "ia3"} <= set(METHODS)
    for name, registered in METHODS.items():
        assert registered.name == name
        assert issubclass(registered.hyperparameters, TrainingHyperparameters)
        assert isinstance(registered.serving_kind, ServingKind)
        assert method_named(name) is registered and method_for_peft_type(registered.peft_type) is registered
    assert method_named("supervised") is METHODS[DEFAULT_METHOD]  # OpenAI's method type
    assert len({m.peft_type for m in METHODS.values()}) == len(METHODS)


@pytest.mark.parametrize("clash", ["name", "alias", "peft_type"])
def test_registering_a_taken_name_alias_or_peft_type_fails(clash: str) -> None:
    lora = METHODS["lora"]
    attributes = {"name": "another", "aliases": (), "peft_type": "ANOTHER", "serving_kind": ServingKind.LOW_RANK}
    attributes.update({"name": {"name": lora.name}, "alias": {"aliases": ("supervised",)},
                       "peft_type": {"peft_type": lora.peft_type}}[clash])
    duplicate = type("Duplicate", (AdapterMethod,), attributes)
    before = dict(METHODS)
    with pytest.raises(DuplicateMethodError):
        register(duplicate)
    assert before == METHODS and method_named("another") is None


@pytest.mark.parametrize("name", ALL_METHODS)
def test_imported_configs_keep_only_the_methods_keys(name: str, settings: Settings) -> None:
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), method(name).peft_config(resolved(name, {}, settings=settings),
                                                                   total_steps=10))
    saved = method(name).saved_config(model.peft_config["default"].to_dict())
    hostile = {**saved, "base_model_name_or_path": "https://example.invalid/model", "auto_mapping": {"x": "y"},
               "revision": "main", "tokenizer_name_or_path": "/etc"}
    kept = method(name).sanitise_config(hostile, max_rank=settings.max_lora_rank, module_names=module_names())
    assert kept["peft_type"] == method(name).peft_type
    assert not {"base_model_name_or_path", "auto_mapping", "revision", "tokenizer_name_or_path"} & set(kept)
    assert set(kept) <= {"peft_type", "task_type", "inference_mode"} | method(name).config_keys


def module_names() -> frozenset[str]:
    return frozenset(n for n, _ in tiny_llama().named_modules() if n)


# Keys of adapter_config.json that PEFT compiles as regular expressions and matches against module names, each with
# a pattern that backtracks for minutes on a module name of about 30 characters.
SLOW = "(.|.)*X"
REGEX_KEYS: dict[str, Any] = {"target_modules": SLOW, "feedforward_modules": SLOW, "alpha_pattern": {SLOW: 8},
                              "rank_pattern": {SLOW: 4}, "layers_pattern": SLOW, "exclude_modules": SLOW,
                              "modules_to_save": [SLOW], "target_parameters": [SLOW]}


@pytest.mark.parametrize("name", ALL_METHODS)
def test_imported_configs_keep_no_regular_expression(name: str, settings: Settings) -> None:
    """Every key PEFT would compile is dropped or refused, naming the key: none reaches the engine or PEFT."""
    from peft import get_peft_model

    from adapters.methods import AdapterLoadError

    model = get_peft_model(tiny_llama(), method(name).peft_config(resolved(name, {}, settings=settings),
                                                                   total_steps=10))
    saved = method(name).saved_config(model.peft_config["default"].to_dict())
    for key, value in REGEX_KEYS.items():
        try:
            kept = method(name).sanitise_config({**saved, key: value}, max_rank=settings.max_lora_rank,
                                                module_names=module_names())
        except AdapterLoadError as exc:
            assert key in str(exc), (key, str(exc))
            continue
        assert key not in kept or kept[key] in (None, [], {}), (key, kept.get(key))


@pytest.mark.parametrize("name", LORA_FAMILY)
def test_pattern_keys_that_name_modules_are_kept_as_exact_names(name: str, settings: Settings) -> None:
    """A suffix or a full name is kept, rewritten as the escaped full names it names (PEFT's regex over each then
    means that module alone); a key that names nothing, or is a regular expression, is refused."""
    import re

    from adapters.methods.base import NotInBaseModel

    base = {"peft_type": method(name).peft_type, "r": 4, "init_r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"]}
    kept = method(name).sanitise_config({**base, "alpha_pattern": {"layers.1.self_attn.q_proj": 2, "q_proj": 16}},
                                        max_rank=settings.max_lora_rank, module_names=module_names())
    assert kept["alpha_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 2,
                                     r"model\.layers\.0\.self_attn\.q_proj": 16}
    for key in kept["alpha_pattern"]:  # as PEFT's get_pattern_key reads them
        assert [m for m in module_names() if re.match(rf"(.*\.)?({key})$", m)] == [key.replace("\\", "")]
    for pattern in ({"q_pro.": 8}, {"(q|v)_proj": 8}, {"": 8}, {".q_proj": 8}):
        with pytest.raises(NotInBaseModel, match="alpha_pattern key .* not regular expressions"):
            method(name).sanitise_config({**base, "alpha_pattern": pattern}, max_rank=settings.max_lora_rank,
                                         module_names=module_names())
    kept = method(name).sanitise_config({**base, "target_modules": "model.layers.0.mlp.down_proj"},
                                        max_rank=settings.max_lora_rank, module_names=module_names())
    assert kept["target_modules"] == ["model.layers.0.mlp.down_proj"]


@pytest.mark.usefixtures("one_torch_thread")
def test_adalora_rank_patterns_as_peft_saves_them_are_kept(settings: Settings, tmp_path: Any) -> None:
    from adapters.methods import AdapterLoadError
    from adapters.methods.base import NotInBaseModel

    hp = resolved("adalora", {"target_modules": ["q_proj", "v_proj"]}, n_examples=80, settings=settings)
    train_adalora(hp, steps=12, call_hook=True).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"]
    kept = method("adalora").sanitise_config(saved, max_rank=settings.max_lora_rank, module_names=module_names())
    assert kept["rank_pattern"] == saved["rank_pattern"]
    for key in ("q_proj.lora_E", "model.layers.0.self_attn.q_proj", "model.layers.[01].self_attn.q_proj.lora_E"):
        with pytest.raises(NotInBaseModel, match="rank_pattern"):
            method("adalora").sanitise_config({**saved, "rank_pattern": {key: [True]}},
                                              max_rank=settings.max_lora_rank, module_names=module_names())
    with pytest.raises(AdapterLoadError, match="rank_pattern"):
        method("adalora").sanitise_config({**saved, "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": 3}},
                                          max_rank=settings.max_lora_rank, module_names=module_names())


# ------------------------------------------------------------------ every method


@pytest.mark.parametrize("name", ALL_METHODS)
def test_resolve_empty_fills_every_value(name: str, settings: Settings) -> None:
    resolved = resolve(name, {}, settings=settings)
    assert resolve(name, None, settings=settings) == resolved
    expected_keys = (COMMON_FIELDS - {"learning_rate_multiplier"}) | own_fields(name)
    assert set(resolved) == expected_keys
    for key, value in resolved.items():
        # beta and gamma belong to preference objectives: a supervised job has none.
        unset = ("max_steps", "early_stopping_patience", "beta", "gamma")
        if key in unset or key in method(name).optional_hyperparameters:
            assert value is None, key
            continue
        assert value is not None, key
        assert value != "auto", key
    assert resolved["learning_rate"] == pytest.approx(method(name).default_learning_rate)
    assert resolved["max_seq_length"] <= settings.max_seq_length_limit


@pytest.mark.parametrize("name", ALL_METHODS)
def test_auto_everywhere_is_the_same_as_omitted(name: str, settings: Settings) -> None:
    everything_auto = {field: "auto" for field in method(name).hyperparameters.model_fields}
    assert set(everything_auto) == COMMON_FIELDS | own_fields(name)
    assert resolve(name, everything_auto, settings=settings) == resolve(name, {}, settings=settings)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_each_method_resolves_its_own_fields(name: str, settings: Settings) -> None:
    assert own_fields(name), f"{name} declares no hyperparameters of its own"
    resolved = resolve(name, {}, settings=settings)
    assert own_fields(name) <= set(resolved)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_given_common_values_are_kept(name: str, settings: Settings) -> None:
    raw = {"n_epochs": 2, "batch_size": 3, "learning_rate": 5e-4, "max_steps": 7, "max_seq_length": 64,
           "warmup_ratio": 0.1, "weight_decay": 0.01}
    resolved = resolve(name, raw, settings=settings)
    assert {k: resolved[k] for k in raw} == raw


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("raw", [
    pytest.param({"no_such_knob": 1}, id="unknown-field"),
    pytest.param({"n_epochs": "three"}, id="wrong-type"),
    pytest.param({"batch_size": 2.5}, id="fractional-int"),
])
def test_invalid_schema_raises_validation_error(name: str, raw: dict[str, Any], settings: Settings) -> None:
    with pytest.raises(ValidationError):
        resolve(name, raw, settings=settings)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_other_methods_fields_are_rejected(name: str, settings: Settings) -> None:
    foreign = set().union(*(own_fields(other) for other in METHODS)) - own_fields(name)
    for field in sorted(foreign):
        with pytest.raises(ValidationError):
            resolve(name, {field: 1}, settings=settings)


OUT_OF_RANGE = [
    ("n_epochs", 0), ("n_epochs", 51), ("batch_size", 0), ("batch_size", 257),
    ("learning_rate", 0), ("learning_rate", -1e-4), ("learning_rate", 2),
    ("learning_rate_multiplier", 0), ("learning_rate_multiplier", 101), ("max_steps", 0),
    ("max_seq_length", 1), ("max_seq_length", 15), ("warmup_ratio", 0.6), ("weight_decay", -0.1),
]


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in OUT_OF_RANGE])
def test_out_of_range_common_value_names_the_field(name: str, field: str, value: Any, settings: Settings) -> None:
    with pytest.raises(HyperparameterError) as info:
        resolve(name, {field: value}, settings=settings)
    assert info.value.param == field
    assert field in str(info.value)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_max_seq_length_is_capped_by_settings(name: str) -> None:
    limited = Settings(max_seq_length_limit=256)
    with pytest.raises(HyperparameterError) as info:
        resolve(name, {"max_seq_length": 257}, settings=limited)
    assert info.value.param == "max_seq_length"
    assert resolve(name, {"max_seq_length": 256}, settings=limited)["max_seq_length"] == 256
    assert resolve(name, {}, settings=limited)["max_seq_length"] == 256


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize(("field", "value"), [("n_epochs", 1), ("n_epochs", 50), ("batch_size", 256),
                                              ("learning_rate", 1), ("warmup_ratio", 0.5), ("weight_decay", 0),
                                              ("max_seq_length", 16)])
def test_boundary_values_are_accepted(name: str, field: str, value: Any, settings: Settings) -> None:
    assert resolve(name, {field: value}, settings=settings)[field] == value


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("multiplier", [0.5, 2, 10.0])
def test_learning_rate_multiplier_scales_the_default(name: str, multiplier: float, settings: Settings) -> None:
    resolved = resolve(name, {"learning_rate_multiplier": multiplier}, settings=settings)
    assert resolved["learning_rate"] == pytest.approx(method(name).default_learning_rate * multiplier)
    # An explicit learning rate wins over the multiplier.
    explicit = resolve(name, {"learning_rate": 3e-4, "learning_rate_multiplier": multiplier}, settings=settings)
    assert explicit["learning_rate"] == pytest.approx(3e-4)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_auto_epochs_follow_openais_rule(name: str, settings: Settings) -> None:
    sizes = [1, 8, 20, 33, 34, 80, 8_333, 8_334, 30_000, 100_000]
    epochs = [resolve(name, {}, n_examples=n, settings=settings)["n_epochs"] for n in sizes]
    # 3 epochs; a small file until about 100 examples are trained (at most 25), a large one about 25,000.
    assert epochs == [25, 12, 5, 3, 3, 3, 3, 2, 1, 1]
    assert resolve(name, {"n_epochs": 2}, n_examples=1, settings=settings)["n_epochs"] == 2


@pytest.mark.parametrize("name", ALL_METHODS)
def test_auto_batch_size_grows_with_dataset_size(name: str, settings: Settings) -> None:
    sizes = [1, 10, 16, 63, 64, 255, 256, 10_000]
    batches = [resolve(name, {}, n_examples=n, settings=settings)["batch_size"] for n in sizes]
    assert batches == [auto_batch_size(n) for n in sizes]
    assert batches == sorted(batches)
    # The documented tiers: 1 below 16 examples, then 2, 4 from 64 and 8 from 256.
    assert batches == [1, 1, 2, 2, 4, 4, 8, 8]
    assert all(b <= n for b, n in zip(batches, sizes, strict=True))
    # An explicit batch size is not overridden by the dataset size.
    assert resolve(name, {"batch_size": 5}, n_examples=1, settings=settings)["batch_size"] == 5


@pytest.mark.parametrize("name", ALL_METHODS)
def test_resolved_values_are_typed_and_round_trip_through_the_stored_form(name: str, settings: Settings) -> None:
    hp = resolved(name, {}, settings=settings)
    assert isinstance(hp, method(name).resolved) and isinstance(hp, ResolvedHyperparameters)
    # What a job stores (JSON) reads back as the same typed values the worker trains with.
    assert method(name).stored(json.loads(json.dumps(hp.model_dump()))) == hp
    # The method's own values are its shape (what a continued adapter keeps); the shared ones are not.
    assert set(hp.shape()) == set(hp.model_dump()) - set(ResolvedHyperparameters.model_fields)
    with pytest.raises(ValidationError):
        method(name).stored({**hp.model_dump(), "surprise": 1})


@pytest.mark.parametrize("name", ALL_METHODS)
def test_peft_config_matches_the_method(name: str, settings: Settings) -> None:
    from peft import PeftConfig, TaskType

    hp = resolved(name, {}, settings=settings)
    config = method(name).peft_config(hp, total_steps=10)
    assert isinstance(config, PeftConfig)
    assert str(config.peft_type.value) == method(name).peft_type
    assert config.task_type == TaskType.CAUSAL_LM
    if "target_modules" in hp.model_fields:
        assert set(config.target_modules) == set(hp.target_modules)  # type: ignore[attr-defined]
    if name in LORA_FAMILY:
        assert set(hp.target_modules) == set(BASE_INFO["default_target_modules"])  # type: ignore[attr-defined]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ALL_METHODS)
def test_peft_model_trains_only_adapter_weights(name: str, settings: Settings) -> None:
    """The config is usable: get_peft_model wraps a Llama, a step's loss back-propagates into the adapter only."""
    import torch
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), method(name).peft_config(resolved(name, {}, settings=settings),
                                                                   total_steps=10))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert not any(n.endswith(("embed_tokens.weight", "lm_head.weight")) for n in trainable)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# ------------------------------------------------------------------ method-specific checks


def test_lora_rank_above_the_maximum(settings: Settings) -> None:
    assert resolve("lora", {"r": settings.max_lora_rank}, settings=settings)["r"] == settings.max_lora_rank
    with pytest.raises(HyperparameterError) as info:
        resolve("lora", {"r": settings.max_lora_rank + 1}, settings=settings)
    assert info.value.param == "r"
    with pytest.raises(HyperparameterError) as info:
        resolve("lora", {"r": 0}, settings=settings)
    assert info.value.param == "r"
    lowered = Settings(max_lora_rank=4)
    with pytest.raises(HyperparameterError) as info:
        resolve("lora", {"r": 5}, settings=lowered)
    assert info.value.param == "r"


def test_lora_defaults_and_given_values(settings: Settings) -> None:
    resolved = resolve("lora", {}, settings=settings)
    assert resolved["r"] == 8
    assert resolved["lora_alpha"] == 16
    assert resolved["target_modules"] == BASE_INFO["default_target_modules"]
    given = resolve("lora", {"r": 4, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["o_proj"]},
                    settings=settings)
    assert (given["r"], given["lora_alpha"], given["lora_dropout"], given["target_modules"]) == (4, 4, 0.0, ["o_proj"])
    assert resolve("lora", {"r": 32}, settings=settings)["lora_alpha"] == 64
    config = method("lora").peft_config(method("lora").stored(given), total_steps=10)
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (4, 4, 0.0, {"o_proj"})


@pytest.mark.parametrize("name", TARGETED)
def test_unknown_target_module_lists_the_available_ones(name: str, settings: Settings) -> None:
    with pytest.raises(HyperparameterError) as info:
        resolve(name, {"target_modules": ["q_proj", "qkv_proj"]}, settings=settings)
    assert info.value.param == "target_modules"
    message = str(info.value)
    assert "qkv_proj" in message
    assert "available" in message
    for module in LLAMA_MODULES:
        assert module in message
    with pytest.raises(HyperparameterError) as info:
        resolve(name, {"target_modules": []}, settings=settings)
    assert info.value.param == "target_modules"
    assert resolve(name, {"target_modules": LLAMA_MODULES}, settings=settings)["target_modules"] == LLAMA_MODULES


@pytest.mark.parametrize("name", LORA_FAMILY)
@pytest.mark.parametrize(("field", "value"), [("lora_alpha", 0), ("lora_alpha", 5000), ("lora_dropout", -0.1),
                                              ("lora_dropout", 0.95)])
def test_lora_family_ranges(name: str, field: str, value: Any, settings: Settings) -> None:
    with pytest.raises(HyperparameterError) as info:
        resolve(name, {field: value}, settings=settings)
    assert info.value.param == field


def test_adalora_target_r_above_init_r(settings: Settings) -> None:
    with pytest.raises(HyperparameterError) as info:
        resolve("adalora", {"init_r": 4, "target_r": 6}, settings=settings)
    assert info.value.param == "target_r"
    assert "init_r" in str(info.value)
    equal = resolve("adalora", {"init_r": 6, "target_r": 6}, settings=settings)
    assert (equal["init_r"], equal["target_r"]) == (6, 6)


@pytest.mark.parametrize(("field", "value"), [("init_r", 0), ("init_r", 10_000), ("target_r", 0)])
def test_adalora_rank_ranges(field: str, value: int, settings: Settings) -> None:
    with pytest.raises(HyperparameterError) as info:
        resolve("adalora", {field: value}, settings=settings)
    assert info.value.param == field


def test_adalora_defaults(settings: Settings) -> None:
    resolved = resolve("adalora", {}, settings=settings)
    assert resolved["target_r"] <= resolved["init_r"]
    assert resolved["lora_alpha"] == 2 * resolved["init_r"]
    small = resolve("adalora", {"init_r": 4}, settings=settings)
    assert small["target_r"] <= 4


def test_adalora_target_r_above_default_init_r(settings: Settings) -> None:
    default_init_r = resolve("adalora", {}, settings=settings)["init_r"]
    try:
        resolved = resolve("adalora", {"target_r": default_init_r + 8}, settings=settings)
    except HyperparameterError as exc:  # acceptable fix: rejected, naming target_r
        assert exc.param == "target_r"
        return
    assert resolved["target_r"] <= resolved["init_r"]  # or: init_r defaults to at least target_r


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 1000])
def test_adalora_budget_schedule_is_valid_for_any_length(steps: int, settings: Settings) -> None:
    config = method("adalora").peft_config(resolved("adalora", {}, settings=settings), total_steps=steps)
    assert config.total_step == steps
    assert 0 <= config.tinit < steps - config.tfinal
    assert config.deltaT >= 1


@pytest.mark.parametrize("value", [0, 257])
def test_prefix_tuning_virtual_tokens_range(value: int, settings: Settings) -> None:
    with pytest.raises(HyperparameterError) as info:
        resolve("prefix_tuning", {"num_virtual_tokens": value}, settings=settings)
    assert info.value.param == "num_virtual_tokens"


def test_prefix_tuning_values_reach_the_config(settings: Settings) -> None:
    assert resolve("prefix_tuning", {}, settings=settings)["num_virtual_tokens"] == 8
    hp = resolved("prefix_tuning", {"num_virtual_tokens": 5}, settings=settings)
    assert method("prefix_tuning").peft_config(hp, total_steps=10).num_virtual_tokens == 5
    assert method("prefix_tuning").serving_kind is ServingKind.KV_PREFIX


def test_prefix_tuning_trains_through_a_projection_by_default(settings: Settings) -> None:
    """The paper's reparameterisation is the default, with its own learning rate; the direct prefix is a choice
    with the larger one it needs. Only a direct prefix can be trained further: the projection is not saved."""
    from adapters.methods.prefix_tuning import DIRECT_LEARNING_RATE

    prefix = method("prefix_tuning")
    projected = resolved("prefix_tuning", {}, settings=settings)
    assert (projected.prefix_projection, projected.encoder_hidden_size) == (True, 512)  # type: ignore[attr-defined]
    assert projected.learning_rate == pytest.approx(prefix.default_learning_rate)
    config = prefix.peft_config(projected, total_steps=10)
    assert (config.prefix_projection, config.encoder_hidden_size) == (True, 512)
    assert not prefix.continues_from_saved_adapter(projected)

    direct = resolved("prefix_tuning", {"prefix_projection": False}, settings=settings)
    assert direct.learning_rate == pytest.approx(DIRECT_LEARNING_RATE) != prefix.default_learning_rate
    assert resolved("prefix_tuning", {"prefix_projection": False, "learning_rate_multiplier": 2},
                    settings=settings).learning_rate == pytest.approx(2 * DIRECT_LEARNING_RATE)
    assert prefix.peft_config(direct, total_steps=10).prefix_projection is False
    assert prefix.continues_from_saved_adapter(direct)
    assert resolved("prefix_tuning", {"prefix_projection": False, "learning_rate": 3e-3},
                    settings=settings).learning_rate == pytest.approx(3e-3)


# ------------------------------------------------------------------ total_steps


@pytest.mark.parametrize(("n_examples", "batch_size", "n_epochs", "max_steps", "expected"), [
    (10, 4, 3, None, 9),  # ceil(10 / 4) = 3 per epoch
    (8, 4, 3, None, 6),
    (9, 4, 1, None, 3),
    (1, 8, 2, None, 2),
    (10, 4, 3, 5, 5),
    (10, 4, 3, 9, 9),
    (10, 4, 3, 100, 9),
    (0, 4, 3, None, 1),
])
def test_total_steps(n_examples: int, batch_size: int, n_epochs: int, max_steps: int | None, expected: int) -> None:
    hp = resolved("lora", {"batch_size": batch_size, "n_epochs": n_epochs, "max_steps": max_steps})
    assert total_steps(n_examples, hp) == expected
    if max_steps is None:
        assert total_steps(n_examples, resolved("lora", {"batch_size": batch_size, "n_epochs": n_epochs})) == expected


@pytest.mark.parametrize("name", ALL_METHODS)
def test_total_steps_from_resolved_hyperparameters(name: str, settings: Settings) -> None:
    hp = resolved(name, {"n_epochs": 2, "batch_size": 3}, n_examples=10, settings=settings)
    assert total_steps(10, hp) == 2 * math.ceil(10 / 3)
    capped = resolved(name, {"n_epochs": 2, "batch_size": 3, "max_steps": 5}, n_examples=10, settings=settings)
    assert total_steps(10, capped) == 5


# ------------------------------------------------------------------ AdaLoRA really reallocates rank


def tiny_llama() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def train_adalora(hp: Any, *, steps: int, call_hook: bool) -> Any:
    import torch
    from peft import get_peft_model

    adalora = method("adalora")
    model = get_peft_model(tiny_llama(), adalora.peft_config(hp, total_steps=steps))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 128, (4, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if call_hook:
            adalora.after_optimizer_step(model, step)
        optimizer.zero_grad()
    return model


def lora_e(model: Any) -> dict[str, Any]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_E" in n}


@pytest.mark.usefixtures("one_torch_thread")
def test_adalora_reallocates_rank_only_with_the_hook(settings: Settings) -> None:
    hp = resolved("adalora", {"target_modules": LLAMA_MODULES}, n_examples=80, settings=settings)
    init_r, target_r = hp.init_r, hp.target_r
    assert target_r < init_r
    steps = 20

    trained = train_adalora(hp, steps=steps, call_hook=True)
    values = lora_e(trained)
    n_modules = 2 * len(LLAMA_MODULES)
    assert len(values) == n_modules
    pattern = trained.peft_config["default"].rank_pattern
    assert pattern, "after_optimizer_step never applied a rank pattern"
    assert len(pattern) == n_modules
    ranks = {name: sum(bool(b) for b in kept) for name, kept in pattern.items()}
    # The budget shrank from init_r to target_r per module on average...
    assert sum(ranks.values()) <= target_r * n_modules
    # ...and was reallocated: not every module keeps the same rank.
    assert len(set(ranks.values())) > 1
    # The pruned singular values are really zero in the weights.
    zeros = sum(int((v == 0).sum()) for v in values.values())
    assert zeros >= (init_r - target_r) * n_modules
    for name, kept in pattern.items():
        [weight] = [v for n, v in values.items() if n == name or n.endswith("." + name)]
        pruned = [i for i, k in enumerate(kept) if not k]
        assert all(float(weight[i].abs().sum()) == 0.0 for i in pruned)

    untouched = train_adalora(hp, steps=steps, call_hook=False)
    assert untouched.peft_config["default"].rank_pattern is None
    assert all(int((v == 0).sum()) == 0 for v in lora_e(untouched).values())


@pytest.mark.usefixtures("one_torch_thread")
def test_an_adalora_checkpoint_with_a_rank_budget_loads_into_a_fresh_model(settings: Settings, tmp_path: Any) -> None:
    """Once AdaLoRA's budget is allocated its servable adapter is cut to the budget, so a checkpoint (a resumed job,
    early stopping's best one) loads the weights as training had them and the budget from the saved config: the
    fresh model then holds the same weights and budget, and saves the same adapter."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file

    from workers.training import checkpoints

    adalora = method("adalora")
    hp = resolved("adalora", {"target_modules": ["q_proj", "v_proj"]}, n_examples=80, settings=settings)
    steps = 20
    trained = train_adalora(hp, steps=steps, call_hook=True)
    assert trained.peft_config["default"].rank_pattern
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    folder = checkpoints.save(tmp_path / "checkpoints", model=trained, method=adalora, optimizer=optimizer,
                              scheduler=scheduler, step=steps, epoch=1, batch=0, trained_tokens=0, metrics={})

    fresh = get_peft_model(tiny_llama(), adalora.peft_config(hp, total_steps=steps))
    checkpoints.load_weights(folder, fresh, adalora)
    assert fresh.peft_config["default"].rank_pattern == trained.peft_config["default"].rank_pattern
    expected = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    for name, parameter in fresh.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, expected[name]), name
    trained.save_pretrained(tmp_path / "trained")
    fresh.save_pretrained(tmp_path / "fresh")
    saved, again = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("trained", "fresh"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_a_saved_adalora_adapter_cut_to_its_budget_continues_in_a_fresh_model(settings: Settings,
                                                                             tmp_path: Any) -> None:
    """A job that continues an AdaLoRA model (`from_model`) starts from its saved adapter, which PEFT cut to the
    rank budget; a new model holds the full initial rank, so the cut factors go back to their kept ranks (zeros
    elsewhere): the new model then computes what the saved one did. Loaded as saved, it is a size mismatch."""
    import json

    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adalora = method("adalora")
    hp = resolved("adalora", {"target_modules": ["q_proj", "v_proj"]}, n_examples=80, settings=settings)
    steps = 20
    trained = train_adalora(hp, steps=steps, call_hook=True).eval()
    pattern = trained.peft_config["default"].rank_pattern
    assert pattern and any(not all(kept) for kept in pattern.values())  # some ranks were pruned
    trained.save_pretrained(tmp_path / "saved")
    tensors = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    saved_config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())

    with pytest.raises(RuntimeError, match="size mismatch"):
        set_peft_model_state_dict(get_peft_model(tiny_llama(), adalora.peft_config(hp, total_steps=steps)), tensors)
    fresh = get_peft_model(tiny_llama(), adalora.peft_config(hp, total_steps=steps)).eval()
    set_peft_model_state_dict(fresh, adalora.adapter_to_continue(tensors, saved_config))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, fresh(input_ids=ids).logits
        base = trained.get_base_model()
        with trained.disable_adapter():
            plain = base(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.usefixtures("one_torch_thread")
def test_adalora_under_bf16_keeps_its_outputs_in_bf16(settings: Settings) -> None:
    """before_training keeps the rank count PEFT divides by in the compute dtype: under bf16 autocast no adapted
    layer's (tokens x features) output is promoted to fp32 and back, forward or backward; the outputs are the same up
    to bf16 rounding; in fp32 nothing changes, and the count is never saved."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from peft.tuners.adalora.layer import SVDLinear
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fp32Divisions(TorchDispatchMode):
        """Counts divisions by a tensor whose result is an fp32 tensor of (tokens x features) or more (a norm's
        division by a plain number is the base model's, in fp32 on purpose)."""

        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.div and isinstance(args[1], torch.Tensor) and \
                    out.dtype == torch.float32 and out.numel() >= ids.numel() * 32:
                self.count += 1
            return out

    adalora = method("adalora")
    hp = resolved("adalora", {"target_modules": LLAMA_MODULES}, n_examples=80, settings=settings)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))

    def layer_outputs(compute_dtype: str | None) -> tuple[dict[str, torch.Tensor], Any, int]:
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama().to(torch.bfloat16), adalora.peft_config(hp, total_steps=10))
        with torch.no_grad():  # non-zero B, so the adapters change every output
            for name, parameter in model.named_parameters():
                if "lora_B" in name or "lora_E" in name:
                    parameter.normal_(0, 0.5)
        if compute_dtype is not None:
            adalora.before_training(model, compute_dtype)
        outputs: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if isinstance(module, SVDLinear):
                module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        with torch.autocast("cpu", dtype=torch.bfloat16), Fp32Divisions() as divisions:
            model(input_ids=ids, labels=ids).loss.backward()
        return outputs, model, divisions.count

    peft_outputs, _, peft_fp32_divisions = layer_outputs(None)
    ours, model, our_fp32_divisions = layer_outputs("bfloat16")
    assert len(ours) == 2 * len(LLAMA_MODULES)
    assert peft_fp32_divisions >= len(ours)  # PEFT's own: one per adapted layer at least (forward and backward)
    assert our_fp32_divisions == 0
    for name, out in ours.items():
        torch.testing.assert_close(out, peft_outputs[name], rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    ranknums = [p for n, p in model.named_parameters() if "ranknum" in n]
    assert ranknums and {p.dtype for p in ranknums} == {torch.bfloat16}
    assert {float(p) for p in ranknums} == {float(hp.init_r)}
    assert not any("ranknum" in key for key in get_peft_model_state_dict(model))

    fp32 = get_peft_model(tiny_llama(), adalora.peft_config(hp, total_steps=10))
    adalora.before_training(fp32, "float32")
    assert {p.dtype for n, p in fp32.named_parameters() if "ranknum" in n} == {torch.float32}


# ------------------------------------------------------------------ the prompt-learning methods and IA³


@pytest.mark.parametrize("name", [n for n in ALL_METHODS if "num_virtual_tokens" in own_fields(n)])
@pytest.mark.parametrize("value", [0, 257])
def test_virtual_tokens_range(name: str, value: int, settings: Settings) -> None:
    with pytest.raises(HyperparameterError) as info:
        resolve(name, {"num_virtual_tokens": value}, settings=settings)
    assert info.value.param == "num_virtual_tokens"


def test_prompt_tuning_init(settings: Settings) -> None:
    assert resolve("prompt_tuning", {}, settings=settings)["prompt_tuning_init"] == "sample_vocab"
    text = resolve("prompt_tuning", {"prompt_tuning_init_text": "Classify the review."}, settings=settings)
    assert (text["prompt_tuning_init"], text["prompt_tuning_init_text"]) == ("text", "Classify the review.")
    with pytest.raises(HyperparameterError) as info:
        resolve("prompt_tuning", {"prompt_tuning_init": "text"}, settings=settings)
    assert info.value.param == "prompt_tuning_init_text"
    config = method("prompt_tuning").peft_config(method("prompt_tuning").stored(text), total_steps=5,
                                                 base_model_path="/models/base")
    assert (config.prompt_tuning_init.value, config.tokenizer_name_or_path) == ("TEXT", "/models/base")
    # What is stored or imported never asks for the init text again (nor keeps a tokenizer path).
    saved = method("prompt_tuning").saved_config(config.to_dict())
    assert saved["prompt_tuning_init"] == "RANDOM" and "tokenizer_name_or_path" not in saved


def test_p_tuning_encoder(settings: Settings) -> None:
    resolved = resolve("p_tuning", {"encoder_reparameterization_type": "lstm", "encoder_hidden_size": 32},
                       settings=settings)
    config = method("p_tuning").peft_config(method("p_tuning").stored(resolved), total_steps=5)
    assert (config.encoder_reparameterization_type.value, config.encoder_hidden_size) == ("LSTM", 32)
    for field, value in (("encoder_hidden_size", 4), ("encoder_num_layers", 9), ("encoder_dropout", 0.9)):
        with pytest.raises(HyperparameterError) as info:
            resolve("p_tuning", {field: value}, settings=settings)
        assert info.value.param == field
    with pytest.raises(ValidationError):
        resolve("p_tuning", {"encoder_reparameterization_type": "transformer"}, settings=settings)


def test_ia3_targets(settings: Settings) -> None:
    resolved = resolve("ia3", {}, settings=settings)
    assert (resolved["target_modules"], resolved["feedforward_modules"]) == (["k_proj", "v_proj", "down_proj"],
                                                                             ["down_proj"])
    with pytest.raises(HyperparameterError) as info:
        resolve("ia3", {"target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}, settings=settings)
    assert info.value.param == "feedforward_modules"
    custom = resolve("ia3", {"target_modules": ["q_proj", "up_proj"]}, settings=settings)
    assert custom["feedforward_modules"] == []
