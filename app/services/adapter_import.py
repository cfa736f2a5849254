"""Importing an adapter trained elsewhere: only adapter_config.json + adapter_model.safetensors, checked
before anything is stored. Nothing uploaded is unpickled, executed, fetched, or used as a path.

The checks, in order: file names (loose files or a zip/tar holding exactly those two, no paths, no
links, bounded count and unpacked size, counted while reading), the config (a registered peft_type;
only the keys its method declares are kept, after the method's own admission checks;
base_model_name_or_path is dropped, never fetched), the weights (parsed as safetensors,
so a pickle renamed to .safetensors fails), then the engine's admission check against the base model
(modules exist, rank, shapes), and last a smoke test: the adapter must change the base model's logits.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import stat
import tarfile
import zipfile
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.store import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, ArtifactStore
from app.db.models import Adapter, AdapterStatus, now
from app.errors import Conflict, DomainError, InvalidRequest, NotFound, TooLarge, Unprocessable
from app.services.ids import new_id
from app.settings import Settings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
MAX_MEMBERS = 16
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")


def refuse(message: str, param: str = "files", error: type[DomainError] = InvalidRequest,
           code: str = "invalid_adapter") -> DomainError:
    return error(message, param=param, code=code)


def check_member_name(name: str) -> str:
    """The file name a member may have: exactly one of the two adapter files, at the top level."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in name.replace("\\", "/").split("/"):
        raise refuse(f"'{name}': absolute paths and '..' are not accepted")
    name = name.removeprefix("./")
    base = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if base.lower().endswith(PICKLE_SUFFIXES):
        raise refuse(f"'{name}': pickle-based formats (.bin, .pt, .pth, .pkl, ...) are refused; "
                     f"send {ADAPTER_WEIGHTS} (safetensors)")
    if name not in ADAPTER_FILES:
        raise refuse(f"'{name}' is not accepted; send exactly {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    return name


def _read_capped(stream: Any, budget: list[int], name: str) -> bytes:
    """Read a member, counting real bytes against the budget (declared sizes can lie)."""
    chunks = []
    while chunk := stream.read(1 << 20):
        budget[0] -= len(chunk)
        if budget[0] < 0:
            raise refuse(f"'{name}': the adapter unpacks to more than the allowed size", error=TooLarge,
                         code="adapter_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def unpack(archive: bytes, limit: int) -> dict[str, bytes]:
    """The adapter files inside a zip or tar archive, checked member by member."""
    buffer = io.BytesIO(archive)
    if zipfile.is_zipfile(buffer):
        return _unpack_zip(buffer, limit)
    buffer.seek(0)
    try:
        with tarfile.open(fileobj=buffer, mode="r:*") as tar:
            return _unpack_tar(tar, limit)
    except tarfile.TarError:
        raise refuse("'file' must be a zip or tar archive of adapter_config.json and adapter_model.safetensors",
                     param="file") from None


def _unpack_zip(buffer: io.BytesIO, limit: int) -> dict[str, bytes]:
    budget, found = [limit], {}
    with zipfile.ZipFile(buffer) as zipped:
        members = [m for m in zipped.infolist() if not m.is_dir()]
        if len(members) > MAX_MEMBERS:
            raise refuse(f"the archive has {len(members)} files; at most {MAX_MEMBERS} are read", param="file")
        for member in members:
            if stat.S_ISLNK(member.external_attr >> 16):
                raise refuse(f"'{member.filename}': links are not accepted", param="file")
            if member.file_size > limit:
                raise refuse(f"'{member.filename}' unpacks to {member.file_size} bytes; the limit is {limit}",
                             param="file", error=TooLarge, code="adapter_too_large")
            name = check_member_name(member.filename)
            with zipped.open(member) as stream:
                found[name] = _read_capped(stream, budget, name)
    return found


def _unpack_tar(tar: tarfile.TarFile, limit: int) -> dict[str, bytes]:
    budget, found = [limit], {}
    for count, member in enumerate(tar, start=1):
        if count > MAX_MEMBERS:
            raise refuse(f"the archive has more than {MAX_MEMBERS} entries", param="file")
        if member.isdir():
            continue
        if not member.isfile():
            raise refuse(f"'{member.name}': links and special files are not accepted", param="file")
        name = check_member_name(member.name)
        stream = tar.extractfile(member)
        if stream is None:
            raise refuse(f"'{member.name}' cannot be read", param="file")
        found[name] = _read_capped(stream, budget, name)
    return found


def sanitised_config(raw: bytes, settings: Settings) -> tuple[dict[str, Any], str]:
    """The config reduced to what its method accepts (the method's own whitelist and admission checks),
    and the method's name."""
    from adapters.methods import AdapterLoadError, for_config

    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise refuse(f"{ADAPTER_CONFIG} must be a JSON object")
    try:
        method = for_config(config)
        return method.sanitise_config(config, max_rank=settings.max_lora_rank), method.name
    except AdapterLoadError as exc:
        raise refuse(str(exc)) from None


def import_adapter(session: Session, *, tenant_id: str, settings: Settings, files: dict[str, bytes],
                   name: str | None, base_model: str | None) -> Adapter:
    from adapters.engine import AdapterLoadError, AdapterRef
    from app.services import base_models
    from app.services.inference import get_engine

    missing = [f for f in ADAPTER_FILES if f not in files]
    if missing:
        raise refuse(f"missing {', '.join(missing)}; send exactly {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        spec = base_models.resolve(settings, base_model or settings.default_base_model)
    except base_models.UnknownBaseModel:
        raise refuse(f"base_model '{base_model}' does not exist", param="base_model", error=NotFound,
                     code="model_not_found") from None
    adapter_id = new_id("adapter")
    if name is not None:
        if not NAME_PATTERN.fullmatch(name):  # fullmatch: `$` alone would let a final newline through
            raise refuse("name must be 1-100 characters: letters, digits, '.', '_', ':' and '-'", param="name")
        taken = session.scalar(select(Adapter.id).where(Adapter.name == name)) is not None
        if taken or name in base_models.registry(settings):
            raise refuse(f"the name '{name}' is already in use", param="name", error=Conflict, code="name_taken")
    config, method = sanitised_config(files[ADAPTER_CONFIG], settings)
    try:
        from safetensors.torch import load as load_safetensors

        load_safetensors(files[ADAPTER_WEIGHTS])  # parses the header and tensors; never unpickles
    except Exception:  # safetensors raises several error types for bad input
        raise refuse(f"{ADAPTER_WEIGHTS} is not a valid safetensors file") from None

    store = ArtifactStore.for_settings(settings)
    staging = store.staging_dir()
    try:
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config))
        (staging / ADAPTER_WEIGHTS).write_bytes(files[ADAPTER_WEIGHTS])
        runtime = get_engine(settings).runtime(spec.id)
        try:
            loaded = runtime.adapters.load(AdapterRef(key=adapter_id, folder=staging, base_model=spec.id,
                                                      method=method))
        except AdapterLoadError as exc:
            raise refuse(f"the adapter does not fit {spec.id}: {exc}", error=Unprocessable) from None
        probe = runtime.tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
        changed = float((runtime.logits(probe, loaded) - runtime.logits(probe, None)).abs().max())
        if changed < 1e-6:
            runtime.unload(adapter_id)
            raise refuse("the adapter does not change the base model's outputs (are its weights all zero?)",
                         error=Unprocessable)
        store.publish_adapter(staging, adapter_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    row = Adapter(id=adapter_id, tenant_id=tenant_id, name=name or f"imported:{spec.id}:{adapter_id[-8:]}",
                  base_model=spec.id, method=method, job_id=None, created_at=now(),
                  size_bytes=store.adapter_size(adapter_id), status=AdapterStatus.ready)
    session.add(row)
    session.commit()
    return row


def archive_of(settings: Settings, adapter: Adapter) -> bytes:
    folder = ArtifactStore.for_settings(settings).fetch_adapter(adapter.id)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name in ADAPTER_FILES:
            zipped.write(folder / name, arcname=name)
    return buffer.getvalue()
