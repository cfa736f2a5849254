"""What a method hands the serving engine: its serving kind and the weights in the form the engine applies.

A method module turns a saved PEFT adapter (config + safetensors tensors) into `ServingWeights` of one
`ServingKind`; the engine knows how to apply each kind per batch row and knows nothing of method names.
Torch is imported only by the functions that build tensors, so the API can import the registry cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch


class ServingKind(StrEnum):
    """How the engine applies an adapter to its rows of a batch."""

    # Per-row B·A corrections on frozen projections, from adapter slots (LoRA, AdaLoRA).
    LOW_RANK = "low_rank"
    # Per-row channel scales on projections' inputs or outputs, from adapter slots (IA³).
    SCALING = "scaling"
    # Per-layer key/value vectors at the front of the row's KV cache (prefix tuning).
    KV_PREFIX = "kv_prefix"
    # Embeddings in front of the row's prompt, prefilled with it (prompt tuning, P-tuning).
    VIRTUAL_TOKENS = "virtual_tokens"

    @property
    def uses_slot(self) -> bool:
        """Kinds whose weights live in the projections' adapter slots."""
        return self in (ServingKind.LOW_RANK, ServingKind.SCALING)


class AdapterLoadError(ValueError):
    """An adapter that cannot be served; the message says why."""


@dataclass
class LoraFactors:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float


@dataclass
class ChannelScale:
    """IA³: a learned vector multiplying a projection's input features or its output features."""

    vector: torch.Tensor  # [in_features] or [out_features]
    side: Literal["input", "output"]


@dataclass
class ServingWeights:
    kind: ServingKind
    rank: int = 0  # LOW_RANK: the largest rank of any module
    low_rank: dict[str, LoraFactors] = field(default_factory=dict)  # module name → factors
    scales: dict[str, ChannelScale] = field(default_factory=dict)  # module name → scale
    # KV_PREFIX: one (key, value) pair per layer, each [kv_heads, num_virtual_tokens, head_dim].
    kv_prefix: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # VIRTUAL_TOKENS: [num_virtual_tokens, hidden_size].
    virtual_tokens: torch.Tensor | None = None

    @property
    def num_virtual_tokens(self) -> int:
        """Cache entries this adapter puts in front of a row's prompt."""
        if self.kind is ServingKind.KV_PREFIX:
            return int(self.kv_prefix[0][0].shape[1]) if self.kv_prefix else 0
        if self.kind is ServingKind.VIRTUAL_TOKENS and self.virtual_tokens is not None:
            return int(self.virtual_tokens.shape[0])
        return 0


def config_int(config: dict[str, Any], key: str) -> int:
    """An integer field of an adapter config, or AdapterLoadError naming it."""
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise AdapterLoadError(f"the adapter config needs an integer {key!r}, got {value!r}")
    return value
