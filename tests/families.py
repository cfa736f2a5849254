"""Tiny randomly initialised models of every base-model family the conformance matrix covers
(tests/adapters/test_families.py), built from each family's transformers config with SmolLM2's tokenizer.

Each is 2 layers of width 64 (4 heads of 16, 2 key/value heads where the family has grouped queries), weights
drawn with std 1/sqrt(64) as tests/tiny_model.py explains. What makes a family special is switched on and made
to matter at this size: Gemma's soft-capping thresholds are small enough to change the logits, and the sliding
windows (Gemma 2 and 3, Mistral) are shorter than the prompts the matrix decodes, so a cache or mask that
ignored the window would give different logits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tests.tiny_model import build_random_model

# The shape every family shares; the per-family options below override or extend it.
COMMON: dict[str, Any] = {"max_position_embeddings": 512, "initializer_range": 64 ** -0.5}
LLAMA_SHAPE: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
WINDOW = 8  # tokens of a sliding window: shorter than the matrix's prompts
ALTERNATING = ["sliding_attention", "full_attention"]

# family → (transformers config class, its options)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**LLAMA_SHAPE, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {**LLAMA_SHAPE, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {**LLAMA_SHAPE, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {**LLAMA_SHAPE, "tie_word_embeddings": False, "sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", {**LLAMA_SHAPE, "sliding_window": WINDOW, "layer_types": ALTERNATING,
                                "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                                "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", {**LLAMA_SHAPE, "sliding_window": WINDOW, "layer_types": ALTERNATING,
                                         "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", {**{k: v for k, v in LLAMA_SHAPE.items() if k != "head_dim"},
                            "tie_word_embeddings": False}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    "gpt_neox": ("GPTNeoXConfig", {**{k: v for k, v in LLAMA_SHAPE.items()
                                      if k not in ("num_key_value_heads", "head_dim")},
                                   "tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {**{k: v for k, v in LLAMA_SHAPE.items() if k != "head_dim"},
                              "tie_word_embeddings": False}),
}


def family_folder(cache: Path, family: str) -> Path:
    """Where the tiny model of this family's recipe is cached (the recipe's hash in the name)."""
    recipe = json.dumps([FAMILIES[family], COMMON], sort_keys=True)
    return cache / f"tiny-{family}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def build_family_model(cache: Path, family: str, tokenizer_source: str, seed: int = 0) -> Path:
    """The tiny model of `family`, built once into `cache`; processes building it at once take turns on a lock."""
    class_name, options = FAMILIES[family]
    return build_random_model(family_folder(cache, family), tokenizer_source, class_name, {**COMMON, **options},
                              seed=seed)
