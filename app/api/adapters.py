"""/v1/adapters: which adapters exist, where each one is (on_disk | cpu | active), pin/load/unload."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic.json_schema import SkipJsonSchema
from starlette.background import BackgroundTask

from app.api.deps import AdapterDep, SessionDep, SettingsDep, TenantDep
from app.errors import InvalidRequest, TooLarge
from app.schemas.adapters import AdapterObject
from app.schemas.common import ListResponse, listed
from app.schemas.errors import errors
from app.services import adapter_import, inference, quotas

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
# The routes that need the serving engine (import checks an adapter by loading it): in role api they are
# forwarded to an inference replica instead (app/api/proxy.py).
engine_router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

# The two ways to send an adapter, exactly one per request: the two files as repeated `files` parts, or one
# archive as `file`. What is inside (names, formats, fit to the base model) is checked by the import service.
IMPORT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"oneOf": [{"required": ["files"]}, {"required": ["file"]}]}}}}}


@router.get("", response_model=ListResponse[AdapterObject], responses=errors(401, 429))
def list_adapters(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    rows = inference.list_adapters(session, tenant_id=tenant)
    return listed([inference.adapter_object(a) for a in rows])


# A form field is sent or not, never null: SkipJsonSchema keeps null out of the document. An empty field
# counts as absent (FastAPI reads it so), hence the empty name in its pattern.
@engine_router.post("", response_model=AdapterObject, responses=errors(400, 401, 404, 409, 413, 422, 429),
             openapi_extra=IMPORT_BODY)
def import_adapter(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                   files: Annotated[list[UploadFile] | SkipJsonSchema[None], File(
                       description="two parts, with the file names adapter_config.json and adapter_model.safetensors",
                       json_schema_extra={"minItems": 2, "maxItems": 2})] = None,
                   file: Annotated[UploadFile | SkipJsonSchema[None], File(
                       description="a zip (deflate or stored) holding those two files; tar is not accepted",
                       json_schema_extra={"format": "adapter-archive"})] = None,
                   name: Annotated[str | SkipJsonSchema[None], Form(
                       description="the model name to serve it under (empty or absent: a generated one)",
                       json_schema_extra={"pattern": f"^$|{adapter_import.NAME_PATTERN.pattern}"})] = None,
                   base_model: Annotated[str | SkipJsonSchema[None], Form(
                       description="the base model it was trained on (default: the server's default)")] = None
                   ) -> dict[str, Any]:
    """Bring a PEFT adapter trained elsewhere (safetensors only; any method the server serves)."""
    quotas.check_adapters(session, tenant_id=tenant, settings=settings)  # before reading what was sent
    limit = settings.max_adapter_mb * 1024 * 1024
    if bool(files) == bool(file):
        raise InvalidRequest("Send either the two files as repeated 'files' parts or one archive as 'file'.",
                             param="files", code="invalid_adapter")
    if file is not None:
        contents = adapter_import.unpack(_read(file, limit), limit)
    else:
        contents = {}
        for part in files or []:
            part_name = adapter_import.check_member_name(part.filename or "")
            if part_name in contents:
                raise InvalidRequest(f"'{part_name}' was sent twice.", param="files", code="invalid_adapter")
            contents[part_name] = _read(part, limit)
    adapter = adapter_import.import_adapter(session, tenant_id=tenant, settings=settings, files=contents, name=name,
                                            base_model=base_model)
    return inference.adapter_object(adapter)


def _read(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := upload.file.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"'{upload.filename}' is larger than the adapter size limit.", param="files",
                           code="adapter_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/{adapter_id:path}/content", response_class=Response, responses={
    200: {"description": "A zip of adapter_config.json and adapter_model.safetensors.",
          "content": {"application/zip": {"schema": {"type": "string", "contentMediaType": "application/zip"}}}},
    **errors(401, 404, 429)})
def download(adapter: AdapterDep, settings: SettingsDep) -> Response:
    archive = adapter_import.archive_of(settings, adapter)
    return FileResponse(archive, media_type="application/zip", filename=f"{adapter.id}.zip",
                        background=BackgroundTask(archive.unlink, missing_ok=True))


# Pinning and loading bring the adapter into memory: a full slot bank is a 409, an adapter that cannot load a 422.
@engine_router.post("/{adapter_id:path}/pin", response_model=AdapterObject, responses=errors(401, 404, 409, 422, 429))
def pin(adapter: AdapterDep, settings: SettingsDep) -> dict[str, Any]:
    inference.pin(settings, adapter, True)
    return inference.adapter_object(adapter)


@engine_router.post("/{adapter_id:path}/unpin", response_model=AdapterObject, responses=errors(401, 404, 429))
def unpin(adapter: AdapterDep, settings: SettingsDep) -> dict[str, Any]:
    inference.pin(settings, adapter, False)
    return inference.adapter_object(adapter)


@engine_router.post("/{adapter_id:path}/load", response_model=AdapterObject, responses=errors(401, 404, 409, 422, 429))
def load(adapter: AdapterDep, settings: SettingsDep) -> dict[str, Any]:
    inference.preload(settings, adapter)
    return inference.adapter_object(adapter)


@engine_router.post("/{adapter_id:path}/unload", response_model=AdapterObject, responses=errors(401, 404, 409, 429))
def unload(adapter: AdapterDep) -> dict[str, Any]:
    inference.unload(adapter)
    return inference.adapter_object(adapter)


@router.get("/{adapter_id:path}", response_model=AdapterObject, responses=errors(401, 404, 429))
def get_adapter(adapter: AdapterDep) -> dict[str, Any]:
    return inference.adapter_object(adapter)
