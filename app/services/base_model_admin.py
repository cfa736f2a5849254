"""Base models the operator registers, lists and removes over the API (/v1/admin/base_models), and what every base
model shows in /v1/models (family, parameters, context length, methods). A registration is checked before it is
accepted, reading only config.json, the tokenizer files, the chat template and the safetensors headers (no torch,
no weights): the first problem found is the refusal's message."""

from __future__ import annotations

import glob
import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters import model_memory
from adapters.families import family_name, unsupported_reason
from adapters.model_memory import BYTES_PER_PARAMETER, HEADROOM, safetensors_header
from app.db.models import TERMINAL_JOB_STATUSES, Adapter, AdapterStatus, FineTuningJob, RegisteredBaseModel
from app.errors import Conflict, InvalidRequest, NotFound
from app.services import base_models
from app.settings import Settings

GIB = 1024**3
# Bytes per parameter in the dtype the engine holds a base model in.
# safetensors' dtype names, as the dtype a checkpoint stores its weights in.
STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I8": "int8",
                 "U8": "uint8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# config.json keys that give the context length, in the order families use them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Any one of these is a tokenizer transformers can load without the model (tokenizer.json: fast; the rest: slow).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The small files a hub model's checks read; its weights are never downloaded to register it.
HUB_PATTERNS = ["config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]


@dataclass(frozen=True)
class Checkpoint:
    """What a base model's files say of it."""

    family: str
    parameters: int
    context_length: int
    stored_dtype: str
    chat_template: bool  # False: the tokenizer has none and chat uses the stated default template


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="source", code="invalid_base_model")


# ------------------------------------------------------------------ reading a checkpoint (no torch, no weights)


def weights_in_headers(folder: Path) -> tuple[int, str]:
    """The parameter count (sum of the tensors' shapes' products; a tied head stored once is counted once) and the
    dtype most of them are stored in, from the folder's safetensors headers."""
    parameters = 0
    by_dtype: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            header = safetensors_header(file)
        except (OSError, ValueError) as exc:
            raise _refuse(f"{file.name} is not a readable safetensors file: {exc}") from None
        for name, tensor in header.items():
            if not isinstance(tensor, dict) or not isinstance(tensor.get("shape"), list):
                raise _refuse(f"{file.name}: tensor {name!r} has no shape in its header")
            count = math.prod(int(d) for d in tensor["shape"])
            parameters += count
            dtype = str(tensor.get("dtype"))
            by_dtype[dtype] = by_dtype.get(dtype, 0) + count
    stored = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else ""
    return parameters, STORED_DTYPES.get(stored, stored.lower())


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise _refuse(f"no config.json in {folder}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _refuse(f"config.json is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _refuse("config.json is not a JSON object")
    return config


def context_length(config: dict[str, Any]) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def has_chat_template(folder: Path) -> bool:
    """tokenizer_config.json's chat_template, or a chat_template.jinja / chat_template.json beside it."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))


def inspect_folder(folder: Path, *, parameters: int | None = None) -> Checkpoint:
    """The checks, in order, each refusal naming the first problem: a folder; config.json; a supported
    architecture; a tokenizer that loads; safetensors weights (unless `parameters` is known otherwise: a hub model
    whose headers were read remotely); a context length. A missing chat template is no refusal: chat then uses the
    stated default template, and completions work with every model."""
    if not folder.exists():
        raise _refuse(f"{folder} does not exist on this host")
    if not folder.is_dir():
        raise _refuse(f"{folder} is not a directory")
    config = _config(folder)
    reason = unsupported_reason(config)
    if reason:
        raise _refuse(f"unsupported architecture: {reason}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise _refuse(f"no tokenizer in {folder} (one of {', '.join(TOKENIZER_FILES)})")
    try:
        from app.services import tokenizers

        tokenizers.load_unregistered(str(folder))
    except Exception as exc:  # whatever transformers raises for a broken tokenizer, named
        raise _refuse(f"the tokenizer does not load: {type(exc).__name__}: {str(exc)[:300]}") from None
    stored = str(config.get("torch_dtype") or config.get("dtype") or "")
    if parameters is None:
        if not any(folder.glob("*.safetensors")):
            raise _refuse(f"no *.safetensors weights in {folder} (pickled checkpoints are never loaded)")
        parameters, stored = weights_in_headers(folder)
    if parameters <= 0:
        raise _refuse("the safetensors files hold no parameters")
    length = context_length(config)
    if length is None:
        raise _refuse(f"config.json states no context length (one of {', '.join(CONTEXT_KEYS)})")
    return Checkpoint(family=family_name(config), parameters=parameters, context_length=length,
                      stored_dtype=stored or "unknown", chat_template=has_chat_template(folder))


def _hub_checkpoint(repo_id: str) -> Checkpoint:
    """A hub model's small files (config, tokenizer) and its safetensors headers, read remotely; never its weights."""
    try:
        from huggingface_hub import HfApi, snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        metadata = HfApi().get_safetensors_metadata(repo_id)
    except Exception as exc:  # offline, unknown, gated, no safetensors: all refusals naming the cause
        raise _refuse(f"the hub model {repo_id} could not be read: {type(exc).__name__}: {str(exc)[:300]}") from None
    counts: dict[str, int] = {str(dtype): int(n) for dtype, n in metadata.parameter_count.items()}
    stored = max(counts, key=lambda d: counts[d]) if counts else ""
    checkpoint = inspect_folder(folder, parameters=sum(counts.values()))
    return Checkpoint(checkpoint.family, checkpoint.parameters, checkpoint.context_length,
                      STORED_DTYPES.get(stored, checkpoint.stored_dtype), checkpoint.chat_template)


def inspect_source(source: str) -> Checkpoint:
    """A local folder (an absolute path) or a hub id, checked."""
    if source.startswith("/"):
        return inspect_folder(Path(source))
    if HUB_ID.match(source) and not source.startswith((".", "~")):
        return _hub_checkpoint(source)
    raise _refuse(f"{source!r} is neither an absolute folder path nor a hub id (owner/name)")


# ------------------------------------------------------------------ memory on this host's device


def host_device(settings: Settings) -> str:
    """Where this host's engine would hold the model ("cuda" or "cpu"), decided without torch (as the worker's
    device class is: app/services/training_queues.py)."""
    if settings.device == "auto":
        return "cuda" if glob.glob("/dev/nvidia[0-9]*") else "cpu"
    return settings.device


def serving_dtype(settings: Settings, device: str) -> str:
    """The dtype the engine holds the model in (adapters/compute.py's rule; on a GPU "auto" is counted as bfloat16,
    the same bytes as float16; on a CPU as float32, the most it may take: whether this CPU serves in bfloat16 is
    decided by a probe in the serving process, which the API process does not run)."""
    setting = str(getattr(settings, "serving_dtype", "auto"))  # older settings have no serving_dtype: "auto"
    if setting != "auto":
        return setting
    return "bfloat16" if device.startswith("cuda") else "float32"


def memory_needed(settings: Settings, parameters: int) -> dict[str, Any]:
    """The weights' bytes at the serving dtype on this host's device, against what it has free."""
    device = host_device(settings)
    dtype = serving_dtype(settings, device)
    return {"device": device, "dtype": dtype, "needed_bytes": int(parameters * BYTES_PER_PARAMETER.get(dtype, 4)),
            "free_bytes": model_memory.free_bytes(device)}


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB / 10 else f"{value / GIB:.3f} GiB"


# ------------------------------------------------------------------ what every base model shows

_described: dict[tuple[str, str], dict[str, Any]] = {}
_described_lock = threading.Lock()


def supported_methods(family_supported: bool) -> list[str]:
    """The fine-tuning methods a base model can train and serve: every registered method on a supported family."""
    from adapters.methods import METHODS

    return sorted(METHODS) if family_supported else []


def _facts(checkpoint: Checkpoint | None) -> dict[str, Any]:
    if checkpoint is None:
        return {"family": None, "parameters": None, "context_length": None, "dtype": None, "chat_template": None,
                "methods": []}
    return {"family": checkpoint.family, "parameters": checkpoint.parameters,
            "context_length": checkpoint.context_length, "dtype": checkpoint.stored_dtype,
            "chat_template": "model" if checkpoint.chat_template else "default",
            "methods": supported_methods(True)}


def describe(settings: Settings, spec: base_models.BaseModelSpec,
             row: RegisteredBaseModel | None = None) -> dict[str, Any]:
    """A base model's family, parameters, context length, stored dtype, chat template and methods: a registered
    one's from its row, a declared one's read once per process from its files (nulls while they are not on this
    host: a hub id not downloaded, the default before its tokenizer is prepared)."""
    if row is not None:
        return _facts(Checkpoint(row.family, row.parameters, row.context_length, row.stored_dtype,
                                 row.chat_template))
    key = (spec.id, spec.source)
    with _described_lock:
        if key in _described:
            return _described[key]
    if spec.origin == "api":  # another process registered it: its row has the facts
        from app.db.session import get_sessionmaker

        with get_sessionmaker()() as session:
            row = session.get(RegisteredBaseModel, spec.id)
        facts = describe(settings, spec, row) if row is not None and row.source == spec.source else _facts(None)
        with _described_lock:
            _described[key] = facts
        return facts
    try:
        folder = Path(base_models.metadata_path(settings, spec, prepare=False))
    except FileNotFoundError:
        return _facts(None)
    if not (folder / "config.json").is_file():
        return _facts(None)
    try:
        config = _config(folder)
        recorded = base_models.core.stored_parameter_count(folder)
        parameters, stored = (recorded, "") if recorded is not None else weights_in_headers(folder)
    except InvalidRequest:
        return _facts(None)
    facts = {**_facts(Checkpoint(family_name(config), parameters, context_length(config) or 0,
                                 stored or str(config.get("torch_dtype") or config.get("dtype") or "unknown"),
                                 has_chat_template(folder))),
             "context_length": context_length(config), "methods": supported_methods(unsupported_reason(config) is None)}
    if parameters:
        with _described_lock:
            _described[key] = facts
    return facts


# ------------------------------------------------------------------ the admin's verbs


def base_model_object(settings: Settings, spec: base_models.BaseModelSpec, row: RegisteredBaseModel | None = None,
                      memory: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": spec.id, "object": "base_model", "source": spec.source, "origin": spec.origin,
            "created_at": row.created_at if row is not None else None, **describe(settings, spec, row),
            "memory": memory}


def register(session: Session, settings: Settings, *, model_id: str, source: str) -> dict[str, Any]:
    """Check and record a base model; every process sees it within REGISTRY_CACHE_SECONDS."""
    taken = base_models.registry(settings)
    if model_id in taken or model_id in base_models.DEFAULT_ALIASES:
        raise Conflict(f"A base model named '{model_id}' already exists.", param="id", code="base_model_exists")
    checkpoint = inspect_source(source)
    memory = memory_needed(settings, checkpoint.parameters)
    if memory["needed_bytes"] * HEADROOM > memory["free_bytes"]:  # the same rule as loading (model_memory)
        raise _refuse(f"the model does not fit this host's {memory['device']}: it needs "
                      f"{_gib(memory['needed_bytes'])} in {memory['dtype']} (plus {HEADROOM - 1:.0%} for the KV "
                      f"cache, adapters and activations), {_gib(memory['free_bytes'])} free")
    row = RegisteredBaseModel(id=model_id, source=source, family=checkpoint.family,
                              parameters=checkpoint.parameters, context_length=checkpoint.context_length,
                              stored_dtype=checkpoint.stored_dtype, chat_template=checkpoint.chat_template)
    session.add(row)
    try:
        session.commit()
    except Exception:  # another registration of the same id won the race
        session.rollback()
        if session.get(RegisteredBaseModel, model_id) is not None:
            raise Conflict(f"A base model named '{model_id}' already exists.", param="id",
                           code="base_model_exists") from None
        raise
    base_models.forget_registered()
    return base_model_object(settings, base_models.BaseModelSpec(model_id, source, "api"), row, memory)


def listing(session: Session, settings: Settings) -> list[dict[str, Any]]:
    rows = {row.id: row for row in session.scalars(select(RegisteredBaseModel))}
    return [base_model_object(settings, spec, rows.get(model_id))
            for model_id, spec in base_models.registry(settings).items()]


def remove(session: Session, settings: Settings, *, model_id: str) -> None:
    """Remove a registered base model. The packaged default and ADAPTERY_BASE_MODELS' are the settings' to remove;
    one that unfinished jobs or ready adapters still use is kept (they would fail or become unservable)."""
    spec = base_models.declared(settings).get(model_id)
    if spec is not None or model_id in base_models.DEFAULT_ALIASES:
        where = "declared in ADAPTERY_BASE_MODELS" if spec is not None and spec.origin == "settings" else \
            "the packaged default"
        raise Conflict(f"The base model '{model_id}' is {where}: remove it from the settings, not over the API.",
                       param="model_id", code="base_model_declared")
    row = session.get(RegisteredBaseModel, model_id)
    if row is None:
        raise NotFound(f"No registered base model named '{model_id}'.", param="model_id", code="not_found")
    jobs = session.scalar(select(func.count()).select_from(FineTuningJob).where(
        FineTuningJob.model == model_id, FineTuningJob.status.not_in(list(TERMINAL_JOB_STATUSES))))
    adapters = session.scalar(select(func.count()).select_from(Adapter).where(
        Adapter.base_model == model_id, Adapter.status == AdapterStatus.ready))
    if jobs or adapters:
        raise Conflict(f"The base model '{model_id}' is in use: {jobs} unfinished job(s) and {adapters} adapter(s) "
                       f"on it; cancel the jobs and delete the adapters first.", param="model_id",
                       code="base_model_in_use")
    session.delete(row)
    session.commit()
    base_models.forget_registered()
