"""/v1/files: upload, list, read, preview and delete dataset files. Uploads are streamed to a temporary file
and downloads from the stored one, so no request holds a whole file in memory."""

from __future__ import annotations

import hashlib
from typing import IO, Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic.json_schema import SkipJsonSchema

from adapters.store import ArtifactStore
from app.api.deps import FileDep, IdempotencyKey, SessionDep, SettingsDep, TenantDep
from app.errors import TooLarge
from app.schemas.common import PagedList, paged
from app.schemas.errors import errors
from app.schemas.files import FileDeleted, FileObject, FilePreview, file_object
from app.services import datasets, idempotency, quotas

router = APIRouter(prefix="/v1/files", tags=["files"])
CHUNK = 1 << 20


def _save_limited(upload: UploadFile, limit_mb: int, target: IO[bytes]) -> tuple[int, str]:
    """Copy the upload into `target` a chunk at a time (never whole in memory), refusing it past the limit; its
    size and SHA-256 (for the idempotency key's request hash)."""
    limit = limit_mb * 1024 * 1024
    too_large = TooLarge(f"The file is larger than the {limit_mb} MB upload limit (ADAPTERY_MAX_UPLOAD_MB).",
                         param="file", code="file_too_large")
    if upload.size is not None and upload.size > limit:
        raise too_large  # known from the spooled upload: refused before reading any of it into memory
    size, digest = 0, hashlib.sha256()
    while chunk := upload.file.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large
        digest.update(chunk)
        target.write(chunk)
    target.flush()
    return size, digest.hexdigest()


@router.post("", response_model=FileObject, responses=errors(400, 401, 409, 413, 429))
def upload_file(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                file: Annotated[UploadFile, File(
                    description="JSONL, one training example per line (chat, completion, instruction or text)",
                    json_schema_extra={"format": "jsonl"})],
                purpose: Annotated[str, Form(json_schema_extra={"enum": list(datasets.PURPOSES)})],
                idempotency_key: IdempotencyKey = None) -> Any:
    # Over the tenant's file quotas: refused by the size the multipart parser already knows, before copying it.
    quotas.check_file(session, tenant_id=tenant, settings=settings, size=file.size or 0)
    with ArtifactStore.for_settings(settings).new_upload() as (path, handle):
        size, digest = _save_limited(file, settings.max_upload_mb, handle)

        def create() -> dict[str, Any]:
            row = datasets.create_file(session, tenant_id=tenant, settings=settings, filename=file.filename,
                                       purpose=purpose, upload=path, size=size)
            return file_object(row)

        return idempotency.run_once(session, tenant_id=tenant, key=idempotency_key, create=create,
                                    request_hash=idempotency.body_hash("file", purpose, file.filename, digest))


# A query parameter is sent or not, never null, hence SkipJsonSchema on the optional ones.
After = Annotated[str | SkipJsonSchema[None], Query(description="a file id from the previous page")]


@router.get("", response_model=PagedList[FileObject], responses=errors(400, 401, 404, 429))
def list_files(session: SessionDep, tenant: TenantDep, purpose: str | SkipJsonSchema[None] = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000, after: After = None) -> dict[str, Any]:
    rows, has_more = datasets.list_files(session, tenant_id=tenant, purpose=purpose, limit=limit, after=after)
    return paged([file_object(r) for r in rows], has_more)


@router.get("/{file_id}", response_model=FileObject, responses=errors(401, 404, 429))
def get_file(file: FileDep) -> dict[str, Any]:
    return file_object(file)


@router.get("/{file_id}/content", response_class=Response, responses={
    200: {"description": "The file as uploaded.", "content": {"application/jsonl": {"schema": {"type": "string"}}}},
    **errors(401, 404, 429)})
def get_file_content(file: FileDep, settings: SettingsDep) -> Response:
    # Streamed from disk in chunks: a large file is never read whole into memory.
    return FileResponse(ArtifactStore.for_settings(settings).local_file(file.id), media_type="application/jsonl")


@router.get("/{file_id}/preview", response_model=FilePreview, responses=errors(400, 401, 404, 429))
def preview_file(file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                 limit: Annotated[int, Query(ge=1, le=100)] = 5) -> dict[str, Any]:
    """The first examples of a file, parsed, with their line numbers."""
    return {"object": "list", "data": datasets.preview_file(session, tenant_id=tenant, settings=settings,
                                                            file_id=file_id, limit=limit)}


@router.delete("/{file_id}", response_model=FileDeleted, responses=errors(401, 404, 409, 429))
def delete_file(file_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    row = datasets.delete_file(session, tenant_id=tenant, settings=settings, file_id=file_id)
    return {"id": row.id, "object": "file", "deleted": True}
