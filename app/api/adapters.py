"""/v1/adapters: which adapters exist, where each one is (on_disk | cpu | active), pin/load/unload."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.errors import ApiError
from app.services import adapter_import, inference

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@router.get("")
def list_adapters(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    rows = inference.list_adapters(session, tenant_id=tenant)
    return {"object": "list", "data": [inference.adapter_object(a) for a in rows]}


@router.post("")
def import_adapter(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                   files: Annotated[list[UploadFile] | None, File(description="adapter_config.json and "
                                                                           "adapter_model.safetensors")] = None,
                   file: Annotated[UploadFile | None, File(description="a zip or tar of those two files")] = None,
                   name: Annotated[str | None, Form()] = None,
                   base_model: Annotated[str | None, Form()] = None) -> dict[str, Any]:
    """Bring a PEFT adapter trained elsewhere (LoRA, AdaLoRA or prefix tuning, safetensors only)."""
    limit = settings.max_adapter_mb * 1024 * 1024
    if bool(files) == bool(file):
        raise ApiError(400, "Send either the two files as repeated 'files' parts or one archive as 'file'.",
                       param="files", code="invalid_adapter")
    if file is not None:
        contents = adapter_import.unpack(_read(file, limit), limit)
    else:
        contents = {}
        for part in files or []:
            part_name = adapter_import.check_member_name(part.filename or "")
            if part_name in contents:
                raise ApiError(400, f"'{part_name}' was sent twice.", param="files", code="invalid_adapter")
            contents[part_name] = _read(part, limit)
    adapter = adapter_import.import_adapter(session, tenant_id=tenant, settings=settings, files=contents, name=name,
                                            base_model=base_model)
    return inference.adapter_object(adapter)


def _read(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := upload.file.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"'{upload.filename}' is larger than the adapter size limit.", param="files",
                           code="adapter_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/{adapter_id:path}/content")
def download(adapter_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    return Response(adapter_import.archive_of(settings, adapter), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{adapter.id}.zip"'})


@router.post("/{adapter_id:path}/pin")
def pin(adapter_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    inference.pin(settings, adapter, True)
    return inference.adapter_object(adapter)


@router.post("/{adapter_id:path}/unpin")
def unpin(adapter_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    inference.pin(settings, adapter, False)
    return inference.adapter_object(adapter)


@router.post("/{adapter_id:path}/load")
def load(adapter_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    inference.preload(settings, adapter)
    return inference.adapter_object(adapter)


@router.post("/{adapter_id:path}/unload")
def unload(adapter_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    inference.unload(adapter)
    return inference.adapter_object(adapter)


@router.get("/{adapter_id:path}")
def get_adapter(adapter_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return inference.adapter_object(inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id))
