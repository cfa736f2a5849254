"""P-tuning: virtual tokens produced by a trained prompt encoder, an MLP or an LSTM (Liu et al., 2021).

Only the encoder's output embeddings are needed to serve it: PEFT saves exactly those (the encoder runs
once when the adapter is saved), so it is served as virtual tokens like prompt tuning. Checkpoints keep
the encoder's own weights as well, so a resumed job continues training the encoder.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from pydantic import Field

from adapters.methods.base import (
    AdapterMethod,
    Auto,
    ResolvedHyperparameters,
    TrainingHyperparameters,
    bounded,
    given,
    register,
)
from adapters.methods.prefix_tuning import MAX_VIRTUAL_TOKENS, PROMPT_LEARNING_KEYS, check_virtual_tokens
from adapters.methods.prompt_tuning import virtual_token_weights
from adapters.methods.serving import ServingKind, ServingWeights, config_int


class PTuningHyperparameters(TrainingHyperparameters):
    num_virtual_tokens: int | Auto | None = bounded("virtual tokens", 1, MAX_VIRTUAL_TOKENS)
    encoder_reparameterization_type: Literal["mlp", "lstm"] | Auto | None = Field(
        default=None, description="the prompt encoder: an MLP or a bidirectional LSTM followed by an MLP")
    encoder_hidden_size: int | Auto | None = bounded("the encoder's hidden size", 8, 4096)
    encoder_num_layers: int | Auto | None = bounded("LSTM layers", 1, 4)
    encoder_dropout: float | Auto | None = bounded("dropout inside the encoder", 0, 0.5)


class ResolvedPTuning(ResolvedHyperparameters):
    num_virtual_tokens: int
    encoder_reparameterization_type: Literal["mlp", "lstm"]
    encoder_hidden_size: int
    encoder_num_layers: int
    encoder_dropout: float


@register
class PTuning(AdapterMethod[ResolvedPTuning]):
    name = "p_tuning"
    peft_type = "P_TUNING"
    hyperparameters = PTuningHyperparameters
    resolved = ResolvedPTuning
    # Measured (bench/results/defaults.md): 3e-3 reached 16/24 on the shipped task in 3 epochs, 9e-3 24/24.
    default_learning_rate = 9e-3
    serving_kind = ServingKind.VIRTUAL_TOKENS
    # Its prefix or virtual tokens belong in front of every example: one example per training row.
    packs_examples = False
    config_keys = PROMPT_LEARNING_KEYS | {"encoder_reparameterization_type", "encoder_hidden_size",
                                          "encoder_num_layers", "encoder_dropout"}

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        return {
            "num_virtual_tokens": hp.num_virtual_tokens if given(hp.num_virtual_tokens) else 16,
            "encoder_reparameterization_type": hp.encoder_reparameterization_type
            if given(hp.encoder_reparameterization_type) else "mlp",
            "encoder_hidden_size": hp.encoder_hidden_size if given(hp.encoder_hidden_size) else 128,
            "encoder_num_layers": hp.encoder_num_layers if given(hp.encoder_num_layers) else 2,
            "encoder_dropout": hp.encoder_dropout if given(hp.encoder_dropout) else 0.0,
        }

    def peft_config(self, hp: ResolvedPTuning, *, total_steps: int, base_model_path: str | None = None) -> Any:
        from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType

        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hp.num_virtual_tokens,
            encoder_reparameterization_type=PromptEncoderReparameterizationType[
                hp.encoder_reparameterization_type.upper()],
            encoder_hidden_size=hp.encoder_hidden_size, encoder_num_layers=hp.encoder_num_layers,
            encoder_dropout=hp.encoder_dropout)

    def continues_from_saved_adapter(self, hp: ResolvedPTuning) -> bool:
        return False  # the saved adapter keeps the encoder's output embeddings, not the encoder

    def input_offset(self, hp: ResolvedPTuning) -> int:
        return hp.num_virtual_tokens

    def saved_input_offset(self, config: dict[str, Any]) -> int:
        return config_int(config, "num_virtual_tokens")

    def sanitise_config(self, config: dict[str, Any], *, max_rank: int,
                        module_names: Collection[str]) -> dict[str, Any]:
        check_virtual_tokens(config)
        return super().sanitise_config(config, max_rank=max_rank, module_names=module_names)

    def serving_weights(self, config: dict[str, Any], weights: dict[str, Any], *, model_config: Any,
                        max_rank: int) -> ServingWeights:
        return virtual_token_weights(config, weights, model_config, "P-tuning")
