"""File objects (OpenAI shape plus format, n_examples, n_tokens)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

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
    stats: dict[str, Any] | None = Field(
        default=None, description="token lengths of the examples: min_tokens, max_tokens, mean_tokens, p50_tokens, "
                                  "p95_tokens, trained_tokens (labelled for training) and length_histogram "
                                  "{bin_edges, counts}")


class PreviewRow(BaseModel):
    line: int = Field(description="the line of the file the example is on")
    example: dict[str, Any]


class FilePreview(BaseModel):
    object: Literal["list"] = "list"
    data: list[PreviewRow]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_object(row: File) -> dict[str, Any]:
    return FileObject(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose, status=row.status, status_details=row.status_details,  # type: ignore[arg-type]
                      format=row.format, n_examples=row.n_examples, n_tokens=row.n_tokens,
                      stats=row.stats).model_dump()
