"""Prefix tuning: trained key/value vectors prepended to every attention layer (Li & Liang, 2021).

Trained through a projection by default, as the method's paper does: a small embedding per virtual token passes
through a two-layer MLP into every layer's keys and values. Optimising the keys and values directly is unstable
(the paper's words); on the shipped task it collapsed to one answer for every review at some seeds. The saved
adapter holds the projection's output, so it is served and imported exactly like a direct prefix; a job cannot
continue training it (from_model), since the projection itself is not saved.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

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
from adapters.methods.serving import AdapterLoadError, ServingKind, ServingWeights, config_int

# Config keys shared by the prompt-learning methods (PEFT's PromptLearningConfig).
PROMPT_LEARNING_KEYS = frozenset({"num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim",
                                  "num_transformer_submodules"})
MAX_VIRTUAL_TOKENS = 256
# The default learning rate with prefix_projection false.
DIRECT_LEARNING_RATE = 1e-2


class PrefixTuningHyperparameters(TrainingHyperparameters):
    num_virtual_tokens: int | Auto | None = bounded("prefix length in tokens", 1, MAX_VIRTUAL_TOKENS)
    prefix_projection: bool | Auto | None = Field(
        default=None, description="train the prefix through a two-layer MLP (the paper's reparameterisation; "
                                  "default true); false trains the keys and values directly")
    encoder_hidden_size: int | Auto | None = bounded("the projection's hidden size", 8, 4096)


class ResolvedPrefixTuning(ResolvedHyperparameters):
    num_virtual_tokens: int
    prefix_projection: bool
    encoder_hidden_size: int


@register
class PrefixTuning(AdapterMethod[ResolvedPrefixTuning]):
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    hyperparameters = PrefixTuningHyperparameters
    resolved = ResolvedPrefixTuning
    # Through the projection (the default) the MLP's weights want small steps: on the shipped task 5e-4 learned at
    # every seed in fp32 and bf16, 1e-3 fell to 13-15 / 24 at two seeds in fp32, 2e-3 and above collapsed to one
    # answer (docs/methods.md, prefix tuning).
    default_learning_rate = 5e-4
    serving_kind = ServingKind.KV_PREFIX
    # Its prefix or virtual tokens belong in front of every example: one example per training row.
    packs_examples = False
    config_keys = PROMPT_LEARNING_KEYS | {"encoder_hidden_size", "prefix_projection"}

    def method_defaults(self, hp, *, settings, base_info):  # type: ignore[no-untyped-def,override]
        # Measured over three seeds in fp32 and bf16 on the shipped task (docs/methods.md, prefix tuning).
        return {"num_virtual_tokens": hp.num_virtual_tokens if given(hp.num_virtual_tokens) else 8,
                "prefix_projection": hp.prefix_projection if given(hp.prefix_projection) else True,
                "encoder_hidden_size": hp.encoder_hidden_size if given(hp.encoder_hidden_size) else 512}

    def peft_config(self, hp: ResolvedPrefixTuning, *, total_steps: int, base_model_path: str | None = None) -> Any:
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hp.num_virtual_tokens,
                                  prefix_projection=hp.prefix_projection, encoder_hidden_size=hp.encoder_hidden_size)

    def learning_rate_default(self, hp: TrainingHyperparameters) -> float:
        # Keys and values trained directly start from random values and need larger steps than the projection.
        direct = isinstance(hp, PrefixTuningHyperparameters) and hp.prefix_projection is False
        return DIRECT_LEARNING_RATE if direct else self.default_learning_rate

    def continues_from_saved_adapter(self, hp: ResolvedPrefixTuning) -> bool:
        return not hp.prefix_projection  # the projection's output is saved, not the projection

    def sanitise_config(self, config: dict[str, Any], *, max_rank: int,
                        module_names: Collection[str]) -> dict[str, Any]:
        check_virtual_tokens(config)
        return super().sanitise_config(config, max_rank=max_rank, module_names=module_names)

    def serving_weights(self, config: dict[str, Any], weights: dict[str, Any], *, model_config: Any,
                        max_rank: int) -> ServingWeights:
        embeddings = weights.get("prompt_embeddings")
        if embeddings is None:
            raise AdapterLoadError("prefix-tuning adapter has no prompt_embeddings tensor")
        nvt, layers = config_int(config, "num_virtual_tokens"), config_int(config, "num_layers")
        heads, token_dim = config_int(config, "num_attention_heads"), config_int(config, "token_dim")
        if layers != model_config.num_hidden_layers:
            raise AdapterLoadError(f"prefix adapter was made for {layers} layers; the base model has "
                                   f"{model_config.num_hidden_layers}")
        if embeddings.shape != (nvt, layers * 2 * token_dim):
            raise AdapterLoadError(f"prompt_embeddings has shape {tuple(embeddings.shape)}, expected "
                                   f"({nvt}, {layers * 2 * token_dim})")
        head_dim = token_dim // heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
        model_head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // \
            model_config.num_attention_heads
        if (heads, head_dim) != (kv_heads, model_head_dim):
            raise AdapterLoadError(f"prefix adapter has {heads} heads of {head_dim}; the base model's key/value "
                                   f"cache has {kv_heads} heads of {model_head_dim}")
        # Same layout PEFT's get_prompt uses: [nvt, layers*2, heads, head_dim] → per layer K and V.
        kv = embeddings.float().view(nvt, layers * 2, heads, head_dim).permute(1, 2, 0, 3).contiguous()
        return ServingWeights(kind=ServingKind.KV_PREFIX, kv_prefix=[(kv[2 * i], kv[2 * i + 1])
                                                                     for i in range(layers)])


def check_virtual_tokens(config: dict[str, Any]) -> None:
    nvt = config_int(config, "num_virtual_tokens")
    if not 1 <= nvt <= MAX_VIRTUAL_TOKENS:
        raise AdapterLoadError(f"num_virtual_tokens must be from 1 to {MAX_VIRTUAL_TOKENS}, got {nvt}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterLoadError("num_transformer_submodules must be 1 (decoder-only base models)")
