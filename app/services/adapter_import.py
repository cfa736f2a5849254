"""Importing an adapter trained elsewhere: only adapter_config.json + adapter_model.safetensors, checked
before anything is stored, and nothing left behind when it is refused. Nothing uploaded is unpickled, executed,
fetched, used as a path, or run as a regular expression.

The checks, in order: file names (loose files or a zip holding exactly those two, no paths, no links), the
archive's bounds read from its own records before zipfile parses anything (entries, central directory size), each
member's compression (stored or deflate, which unpack in bounded steps) and its unpacked size, counted while
reading; the config (a registered peft_type; only the keys its method declares are kept, after the method's own
admission checks, with every key PEFT would compile as a regular expression kept only as literal module names of
the base model; base_model_name_or_path is dropped, never fetched); the weights (parsed as safetensors, so a
pickle renamed to .safetensors fails); the engine's admission check against the base model (modules exist, rank,
shapes); and last a smoke test: the adapter must change the base model's logits. Tar is not accepted: tarfile reads
pax and GNU long-name records whole, before any of these checks could run.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapters.store import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, ArtifactStore
from app.db.models import Adapter, AdapterStatus, ModelAlias, now
from app.errors import Conflict, DomainError, InvalidRequest, NotFound, TooLarge, Unprocessable
from app.services.ids import new_id
from app.settings import Settings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
MAX_MEMBERS = 16
# zipfile reads the whole central directory and makes an object of every entry before anyone can count them: the
# directory of 16 entries with names and extras of a few KiB each is far below this.
MAX_CENTRAL_DIRECTORY = 64 * 1024
# Deflate unpacks in steps of the size asked for (so the unpacked budget holds while reading); bzip2 and LZMA
# unpack whole blocks at once, gigabytes from a few KiB.
ACCEPTED_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
ARCHIVE_FORMAT = f"a zip archive of {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (tar and other formats are not accepted)"
FINE_TUNED_PREFIX = "ft:"  # app/services/jobs/creation.py, fine_tuned_model_name
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
    """The adapter files inside a zip archive, checked member by member."""
    entries, directory_size = _zip_bounds(archive)
    if entries > MAX_MEMBERS:
        raise refuse(f"the archive has {entries} entries; at most {MAX_MEMBERS} are read", param="file")
    if directory_size > MAX_CENTRAL_DIRECTORY:
        raise refuse(f"the archive's central directory is {directory_size} bytes; at most {MAX_CENTRAL_DIRECTORY} "
                     "are read", param="file")
    try:
        return _unpack_zip(io.BytesIO(archive), limit)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise refuse(f"'file' is not a readable zip archive ({exc}); send {ARCHIVE_FORMAT}", param="file") from None


def _zip_bounds(archive: bytes) -> tuple[int, int]:
    """(entries, central directory bytes) as the archive's end records declare them, read the way zipfile reads
    them (_EndRecData, _EndRecData64: the end-of-central-directory record at the very end or the last one in the
    final 64 KiB, then a zip64 record wherever its locator precedes it). zipfile reads exactly this many directory
    bytes and makes an object of each entry in them, so bounding these bounds what it parses."""
    signature, size = b"PK\x05\x06", 22
    end = len(archive) - size
    if not (end >= 0 and archive[end:end + 4] == signature and archive[-2:] == b"\x00\x00"):
        end = archive.rfind(signature, max(0, len(archive) - size - 0xFFFF))
    if end < 0 or len(archive) - end < size:
        raise refuse(f"'file' must be {ARCHIVE_FORMAT}", param="file")
    entries, directory_size = struct.unpack("<HL", archive[end + 10:end + 16])
    locator, record = end - 20, end - 20 - 56
    if record >= 0 and archive[locator:locator + 4] == b"PK\x06\x07" and archive[record:record + 4] == b"PK\x06\x06":
        entries, directory_size = struct.unpack("<2Q", archive[record + 32:record + 48])
    return entries, directory_size


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
            if member.flag_bits & 0x1:
                raise refuse(f"'{member.filename}' is encrypted; send it unencrypted", param="file")
            if member.compress_type not in ACCEPTED_COMPRESSION:
                raise refuse(f"'{member.filename}' uses compression method {member.compress_type}; members must be "
                             f"stored or compressed with deflate", param="file")
            name = check_member_name(member.filename)
            with zipped.open(member) as stream:
                found[name] = _read_capped(stream, budget, name)
    return found


def parsed_config(raw: bytes) -> tuple[dict[str, Any], Any]:
    """The uploaded config as a JSON object, and the registered method of its peft_type."""
    from adapters.methods import AdapterLoadError, for_config

    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise refuse(f"{ADAPTER_CONFIG} must be a JSON object")
    try:
        return config, for_config(config)
    except AdapterLoadError as exc:
        raise refuse(str(exc)) from None


def sanitised_config(config: dict[str, Any], method: Any, *, settings: Settings,
                     module_names: frozenset[str]) -> dict[str, Any]:
    """The config reduced to what its method accepts (the method's own whitelist and admission checks), every
    module-name pattern checked against the base model's `module_names`: 422 for one that names no module, 400 for
    anything else the method refuses."""
    from adapters.methods import AdapterLoadError
    from adapters.methods.base import NotInBaseModel

    try:
        return dict(method.sanitise_config(config, max_rank=settings.max_lora_rank, module_names=module_names))
    except NotInBaseModel as exc:
        raise refuse(str(exc), error=Unprocessable) from None
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
        if name[:3].lower() == FINE_TUNED_PREFIX:  # the service's names for its fine-tuned models (jobs' results)
            raise refuse(f"name may not start with '{FINE_TUNED_PREFIX}': that prefix is reserved for models "
                         "fine-tuned here; choose another name", param="name", code="reserved_name")
        if _name_taken(session, settings, tenant_id, name):
            raise refuse(f"the name '{name}' is already in use", param="name", error=Conflict, code="name_taken")
    raw_config, method = parsed_config(files[ADAPTER_CONFIG])
    try:
        from safetensors.torch import load as load_safetensors

        load_safetensors(files[ADAPTER_WEIGHTS])  # parses the header and tensors; never unpickles
    except Exception:  # safetensors raises several error types for bad input
        raise refuse(f"{ADAPTER_WEIGHTS} is not a valid safetensors file") from None

    runtime = get_engine(settings).runtime(spec.id)
    module_names = frozenset(n for n, _ in runtime.model.named_modules() if n)
    config = sanitised_config(raw_config, method, settings=settings, module_names=module_names)
    store = ArtifactStore.for_settings(settings)
    staging = store.staging_dir()
    published = False
    try:
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config))
        (staging / ADAPTER_WEIGHTS).write_bytes(files[ADAPTER_WEIGHTS])
        try:
            loaded = runtime.adapters.load(AdapterRef(key=adapter_id, folder=staging, base_model=spec.id,
                                                      method=method.name))
        except AdapterLoadError as exc:
            raise refuse(f"the adapter does not fit {spec.id}: {exc}", error=Unprocessable) from None
        probe = runtime.tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
        changed = float((runtime.logits(probe, loaded) - runtime.logits(probe, None)).abs().max())
        if changed < 1e-6:
            raise refuse("the adapter does not change the base model's outputs (are its weights all zero?)",
                         error=Unprocessable)
        store.publish_adapter(staging, adapter_id)
        published = True
        row = Adapter(id=adapter_id, tenant_id=tenant_id, name=name or f"imported:{spec.id}:{adapter_id[-8:]}",
                      base_model=spec.id, method=method.name, job_id=None, created_at=now(),
                      size_bytes=store.adapter_size(adapter_id), status=AdapterStatus.ready)
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # another import took the name since it was checked
            session.rollback()
            raise refuse(f"the name '{name}' is already in use", param="name", error=Conflict,
                         code="name_taken") from None
    except BaseException:
        # A refused import leaves nothing behind: no residency record (a failed load writes one), no weights in
        # memory or in a slot, no stored folder.
        runtime.unload(adapter_id)
        runtime.adapters.forget(adapter_id)
        if published:
            store.delete_adapter(adapter_id)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return row


def _name_taken(session: Session, settings: Settings, tenant_id: str, name: str) -> bool:
    from app.services import base_models

    # Names are per tenant: another tenant's adapter of this name neither blocks it nor shows that it exists.
    return session.scalar(select(Adapter.id).where(Adapter.tenant_id == tenant_id, Adapter.name == name)) \
        is not None or name in base_models.registry(settings) or \
        session.get(ModelAlias, (tenant_id, name)) is not None


def archive_of(settings: Settings, adapter: Adapter) -> Path:
    """A zip of the adapter's files in a temporary file (the caller removes it once sent): a large adapter is
    never whole in memory on its way out."""
    folder = ArtifactStore.for_settings(settings).fetch_adapter(adapter.id)
    fd, name = tempfile.mkstemp(prefix="adaptery-download-", suffix=".zip")
    with os.fdopen(fd, "wb") as target, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zipped:
        for member in ADAPTER_FILES:
            zipped.write(folder / member, arcname=member)
    return Path(name)
