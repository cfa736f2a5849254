"""Base-model families: what training, serving and registration need to know of an architecture, read from its
transformers config (a dict from config.json; no weights, no torch): the family's name, its projections (which are
attention and which feed-forward, fused or not, Linear or Conv1D), the defaults that follow from them, and why the
engine cannot serve it, if it cannot.

A family is a table entry here and a tiny model in the conformance matrix (tests/families.py,
tests/adapters/test_families.py); a family is listed as served only once every cell of the matrix passes for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One architecture's structure, by module name (the last part of a module's dotted name, or a dotted tail where
    the last part alone is ambiguous, as GPT-2's `c_proj` is both attention output and MLP output)."""

    model_type: str  # transformers' `model_type`
    title: str
    attention: tuple[str, ...]  # the attention block's projections (queries, keys, values, output)
    mlp: tuple[str, ...]  # the feed-forward block's projections
    # The projections whose outputs carry the keys and values (a fused projection carries the queries too), and
    # the feed-forward projection whose input is scaled: what channel scaling (IA³) adapts by default.
    keys_values: tuple[str, ...]
    mlp_input: tuple[str, ...]
    fused: tuple[str, ...] = ()  # projections that compute several things in one matmul
    conv1d: bool = False  # projections are transformers' Conv1D (weight stored [in, out]) rather than nn.Linear
    special: str = ""  # what sets it apart (documentation)
    # Why the engine cannot serve it yet (None: the conformance matrix passes for it).
    missing: str | None = None

    @property
    def projections(self) -> tuple[str, ...]:
        """Every projection of a block: the default targets of low-rank adapters."""
        return self.attention + self.mlp

    @property
    def scaled(self) -> tuple[str, ...]:
        """Channel scaling's default targets (keys and values, then the MLP input)."""
        return self.keys_values + self.mlp_input


_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def _llama_like(model_type: str, title: str, special: str, missing: str | None = None) -> Family:
    return Family(model_type, title, _LLAMA_ATTENTION, _LLAMA_MLP, keys_values=("k_proj", "v_proj"),
                  mlp_input=("down_proj",), special=special, missing=missing)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _llama_like("llama", "Llama", "the reference layout: separate q/k/v/o, gated MLP"),
    _llama_like("qwen2", "Qwen2", "biases on q/k/v; tied output head"),
    _llama_like("qwen3", "Qwen3", "RMS norm of queries and keys per head; tied output head"),
    _llama_like("mistral", "Mistral", "sliding-window attention"),
    _llama_like("gemma2", "Gemma 2", "scaled embeddings, tied head, soft-capped attention scores and logits, "
                                     "sliding and global attention layers alternating"),
    _llama_like("gemma3_text", "Gemma 3 (text)", "scaled embeddings, tied head, q/k norm, sliding and global "
                                                 "attention layers alternating with their own rotary bases"),
    _llama_like("olmo2", "OLMo 2", "norms after attention and MLP; q/k norm over the whole projection"),
    Family("phi3", "Phi-3", ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"), keys_values=("qkv_proj",),
           mlp_input=("down_proj",), fused=("qkv_proj", "gate_up_proj"),
           special="fused qkv_proj and gate_up_proj"),
    Family("gpt_neox", "GPT-NeoX", ("query_key_value", "dense"), ("dense_h_to_4h", "dense_4h_to_h"),
           keys_values=("query_key_value",), mlp_input=("dense_4h_to_h",), fused=("query_key_value",),
           special="fused query_key_value, partial rotary, parallel attention and MLP"),
    Family("gpt2", "GPT-2", ("c_attn", "attn.c_proj"), ("c_fc", "mlp.c_proj"), keys_values=("c_attn",),
           mlp_input=("mlp.c_proj",), fused=("c_attn",), conv1d=True,
           special="Conv1D projections, fused c_attn, learned absolute positions, tied head"),
)}


def family_name(config: dict[str, Any]) -> str:
    """The family of a model config (its transformers `model_type`)."""
    return str(config.get("model_type") or "unknown")


def family_of(config: dict[str, Any]) -> Family | None:
    """The family's structure, None for an architecture not in the table."""
    return FAMILIES.get(family_name(config))


def served_families() -> list[str]:
    """The model types the engine serves and trains (every cell of the conformance matrix passes)."""
    return [name for name, family in FAMILIES.items() if family.missing is None]


def unsupported_reason(config: dict[str, Any]) -> str | None:
    """Why the engine cannot serve and train this architecture, naming what is missing; None when it can."""
    name = family_name(config)
    family = FAMILIES.get(name)
    if family is None:
        return (f"model_type {name!r} is not a supported family (its projections, attention and cache layout are "
                f"untested); supported: {', '.join(served_families())}")
    if family.missing is not None:
        return f"{family.title} ({name}): {family.missing}"
    return None


# The model types served today, for callers that want the list.
SUPPORTED_MODEL_TYPES = tuple(served_families())
