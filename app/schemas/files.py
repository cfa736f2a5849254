"""File objects (OpenAI shape plus format, n_examples, n_tokens)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from app.db.models import File


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    format: str | None = None
    n_examples: int | None = None
    n_tokens: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_object(row: File) -> dict[str, Any]:
    return FileObject(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose, status=row.status, status_details=row.status_details,  # type: ignore[arg-type]
                      format=row.format, n_examples=row.n_examples, n_tokens=row.n_tokens).model_dump()
