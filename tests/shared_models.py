"""The models the suite shares, in .cache/models: SmolLM2-135M-Instruct converted from its packaged GGUF, and the
tiny model (SmolLM2's tokenizer, random weights). Each is built once per checkout: by the first test that needs it,
or beforehand by `python -m tests.shared_models`, which `make check` runs beside ruff and mypy. On a fresh clone the
conversion otherwise took the fast tier's first 31 s, with every test process waiting for it."""

from __future__ import annotations

import os
from pathlib import Path

from tests.tiny_model import build_tiny_model, tiny_model_folder

ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = ROOT / ".cache" / "models"


def use_the_cache() -> None:
    """Every model the suite converts or builds goes to MODEL_CACHE (the tests' processes inherit it)."""
    os.environ["ADAPTERY_MODEL_CACHE_DIR"] = str(MODEL_CACHE)


def default_model() -> Path:
    """SmolLM2-135M-Instruct converted from the packaged GGUF (about 20 s the first time, then cached)."""
    from app.services import base_models
    from app.settings import DEFAULT_BASE_MODEL, Settings

    settings = Settings()
    return Path(base_models.local_path(settings, base_models.resolve(settings, DEFAULT_BASE_MODEL)))


def tiny_model(default: Path) -> Path:
    """The tiny model, with the default model's tokenizer."""
    return build_tiny_model(tiny_model_folder(MODEL_CACHE), str(default))


if __name__ == "__main__":
    use_the_cache()
    print(f"the suite's models are ready: {tiny_model(default_model())}")
