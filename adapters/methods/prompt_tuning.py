"""Prompt tuning: learned virtual-token embeddings in front of every prompt (Lester et al., 2021).

Served as virtual tokens: the row's prefill starts with the adapter's embeddings, so it batches with
every other method.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from pydantic import Field

from adapters.methods.base import (
    AdapterMethod,
    Auto,
    HyperparameterError,
    ResolvedHyperparameters,
    TrainingHyperparameters,
    bounded,
    given,
    register,
)
from adapters.methods.prefix_tuning import MAX_VIRTUAL_TOKENS, PROMPT_LEARNING_KEYS, check_virtual_tokens
from adapters.methods.serving import AdapterLoadError, ServingKind, ServingWeights, config_int

INIT_TEXT_MAX_CHARS = 2000


class PromptTuningHyperparameters(TrainingHyperparameters):
    num_virtual_tokens: int | Auto | None = bounded("virtual tokens", 1, MAX_VIRTUAL_TOKENS)
    prompt_tuning_init: Literal["random", "sample_vocab", "text"] | Auto | None = Field(
        default=None, description="start from random vectors, embeddings of random vocabulary tokens, or the "
                                  "embeddings of prompt_tuning_init_text")
    prompt_tuning_init_text: str | Auto | None = Field(default=None, max_length=INIT_TEXT_MAX_CHARS,
                                                description="the text whose token embeddings start the prompt")


class ResolvedPromptTuning(ResolvedHyperparameters):
    num_virtual_tokens: int
    prompt_tuning_init: Literal["random", "sample_vocab", "text"]
    prompt_tuning_init_text: str | None


def virtual_token_weights(config: dict[str, Any], weights: dict[str, Any], model_config: Any,
                          method: str) -> ServingWeights:
    """prompt_embeddings [num_virtual_tokens, hidden] as the engine's virtual tokens (prompt tuning, P-tuning)."""
    embeddings = weights.get("prompt_embeddings")
    if embeddings is None:
        raise AdapterLoadError(f"{method} adapter has no prompt_embeddings tensor")
    nvt = config_int(config, "num_virtual_tokens")
    if tuple(embeddings.shape) != (nvt, model_config.hidden_size):
        raise AdapterLoadError(f"prompt_embeddings has shape {tuple(embeddings.shape)}; this base model needs "
                               f"({nvt}, {model_config.hidden_size})")
    return ServingWeights(kind=ServingKind.VIRTUAL_TOKENS, virtual_tokens=embeddings.float().contiguous())


@register
class PromptTuning(AdapterMethod[ResolvedPromptTuning]):
    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    hyperparameters = PromptTuningHyperparameters
    resolved = ResolvedPromptTuning
    # Soft prompts need much larger steps than weight updates (Lester et al. used 0.3 with Adafactor).
    default_learning_rate = 3e-2
    serving_kind = ServingKind.VIRTUAL_TOKENS
    # Its prefix or virtual tokens belong in front of every example: one example per training row.
    packs_examples = False
    optional_hyperparameters = frozenset({"prompt_tuning_init_text"})
    # The init fields are dropped on import (the weights carry what was learned); tokenizer paths are never kept.
    config_keys = PROMPT_LEARNING_KEYS | {"prompt_tuning_init"}

    def check(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        if hp.prompt_tuning_init == "text" and not (given(hp.prompt_tuning_init_text)
                                                    and hp.prompt_tuning_init_text.strip()):
            raise HyperparameterError("prompt_tuning_init_text", "prompt_tuning_init 'text' needs a non-empty "
                                                                 "prompt_tuning_init_text")

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        init = hp.prompt_tuning_init if given(hp.prompt_tuning_init) else (
            "text" if given(hp.prompt_tuning_init_text) else "sample_vocab")
        return {"num_virtual_tokens": hp.num_virtual_tokens if given(hp.num_virtual_tokens) else 16,
                "prompt_tuning_init": init,
                "prompt_tuning_init_text": hp.prompt_tuning_init_text if init == "text" else None}

    def peft_config(self, hp: ResolvedPromptTuning, *, total_steps: int, base_model_path: str | None = None) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        init = PromptTuningInit[hp.prompt_tuning_init.upper()]
        text: dict[str, Any] = {"prompt_tuning_init_text": hp.prompt_tuning_init_text,
                                "tokenizer_name_or_path": base_model_path} if init is PromptTuningInit.TEXT else {}
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hp.num_virtual_tokens,
                                  prompt_tuning_init=init, **text)

    def saved_config(self, config: dict[str, Any]) -> dict[str, Any]:
        # Loading a TEXT-initialised config would tokenise the init text again from a tokenizer path;
        # the trained weights make that pointless, and the path is this machine's.
        cleaned = {k: v for k, v in config.items() if k not in ("prompt_tuning_init_text", "tokenizer_name_or_path",
                                                                 "tokenizer_kwargs")}
        return {**cleaned, "prompt_tuning_init": "RANDOM"}

    def input_offset(self, hp: ResolvedPromptTuning) -> int:
        return hp.num_virtual_tokens

    def saved_input_offset(self, config: dict[str, Any]) -> int:
        return config_int(config, "num_virtual_tokens")

    def sanitise_config(self, config: dict[str, Any], *, max_rank: int,
                        module_names: Collection[str]) -> dict[str, Any]:
        check_virtual_tokens(config)
        return self.saved_config(super().sanitise_config(config, max_rank=max_rank, module_names=module_names))

    def serving_weights(self, config: dict[str, Any], weights: dict[str, Any], *, model_config: Any,
                        max_rank: int) -> ServingWeights:
        return virtual_token_weights(config, weights, model_config, "prompt-tuning")
