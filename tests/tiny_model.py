"""A tiny randomly initialised Llama that uses SmolLM2's real tokenizer (fast tests, real code paths)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TINY_MODEL_ID = "tiny-llama"

# The tiny model's shape. Weights are drawn with std 1/sqrt(hidden_size) (fan-in scaled), not transformers'
# default 0.02: with 0.02 the output head's rows are so short (0.02 × sqrt(64) = 0.16) that no hidden state can
# give any token a logit above about 1.3, so the loss cannot fall below about 9.5 nats (a uniform guess is 10.8)
# whatever an adapter learns, and a test asking whether training helped measures noise. At 1/sqrt(64) = 0.125 a
# token can get a logit near 8: every method's validation loss falls by 0.35–3 nats in the end-to-end case in
# float32 and bfloat16 alike (seeds 1, 2, 7), where it fell by 0.01–0.3 (and once rose) before.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "initializer_range": 64 ** -0.5,
}


def tiny_model_folder(cache: Path) -> Path:
    """Where the tiny model of this recipe is cached: the recipe's hash is in the name, so a changed recipe
    builds a new model instead of reusing an old one."""
    recipe = hashlib.sha256(json.dumps(TINY_CONFIG, sort_keys=True).encode()).hexdigest()[:8]
    return cache / f"{TINY_MODEL_ID}-{recipe}"


def build_tiny_model(target: Path, tokenizer_source: str, seed: int = 0) -> Path:
    """The tiny model at `target`, built once (see build_random_model)."""
    return build_random_model(target, tokenizer_source, "LlamaConfig", TINY_CONFIG, seed=seed,
                              model_class="LlamaForCausalLM")


def build_random_model(target: Path, tokenizer_source: str, config_class: str, options: dict[str, Any], *,
                       seed: int = 0, model_class: str | None = None) -> Path:
    """A randomly initialised model of transformers' `config_class` with `options` (`model_class`, or the causal
    LM class transformers picks for the config) and SmolLM2's tokenizer, at `target`, built once: test processes
    running at once (pytest-xdist) take turns on a lock file, and the later ones find it built."""
    from adapters.base_models import made_once

    def build(folder: Path) -> None:
        import shutil

        import torch
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_source)
        torch.manual_seed(seed)
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **options)
        model = (getattr(transformers, model_class)(config) if model_class
                 else transformers.AutoModelForCausalLM.from_config(config))
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted build left
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)

    made_once(target, "config.json", build)
    return target
