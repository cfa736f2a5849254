"""Dataset uploads: check every line, count tokens, and store the file only when all of it is usable (and the
tenant's file quotas allow it). The upload arrives as a temporary file and is read line by line."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.data import DatasetError, check_lengths, describe_problems, encode_any, length_stats, parse_jsonl
from adapters.store import ArtifactStore
from app.db.models import File, FileStatus, FineTuningJob, JobStatus, now
from app.errors import Conflict, DomainError, InvalidRequest, not_found
from app.services import evaluations, quotas, tokenizers
from app.services.ids import new_id, storable
from app.settings import Settings

PURPOSES = ("fine-tune",)


def clean_filename(name: str | None) -> str:
    """A display name only (never a path): last path component, printable, at most 255 characters."""
    name = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = re.sub(r"\s+", " ", name).strip() or "upload.jsonl"
    return name[:255]


def create_file(session: Session, *, tenant_id: str, settings: Settings, filename: str | None, purpose: str,
                upload: Path, size: int) -> File:
    """Validate the upload streamed to `upload` (a temporary file of ArtifactStore.new_upload, `size` bytes), then
    store it; the file is read line by line, never whole."""
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose '{purpose}' is not supported; accepted: {', '.join(PURPOSES)}.",
                             param="purpose", code="invalid_purpose")
    quotas.check_file(session, tenant_id=tenant_id, settings=settings, size=size)
    try:
        with upload.open("rb") as lines:
            dataset = parse_jsonl(lines, max_examples=settings.max_examples_per_file)
        examples = encode_any(tokenizers.default(settings), dataset)
    except DatasetError as exc:
        raise InvalidRequest(f"Invalid training file: {exc}", param="file", code="invalid_file") from None
    problems = check_lengths(examples, dataset.line_numbers, max_tokens=settings.max_example_tokens)
    if problems:
        raise InvalidRequest(f"Invalid training file: {describe_problems(problems)}", param="file",
                             code="invalid_file")
    total_tokens = sum(len(e.input_ids) for e in examples)
    if total_tokens > settings.max_tokens_per_file:
        raise InvalidRequest(f"The file has {total_tokens} tokens; at most {settings.max_tokens_per_file} are "
                             "accepted per file.", param="file", code="invalid_file")
    file_id = new_id("file")
    # The bytes are on disk before the row exists, so a crash never leaves a row without its file.
    ArtifactStore.for_settings(settings).publish_file(file_id, upload)
    row = File(id=file_id, tenant_id=tenant_id, filename=clean_filename(filename), purpose=purpose,
               bytes=size, created_at=now(), status=FileStatus.processed.value, format=dataset.format,
               n_examples=len(examples), n_tokens=total_tokens, stats=length_stats(examples))
    session.add(row)
    session.commit()
    return row


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File:
    row = session.get(File, file_id) if storable(file_id) else None
    if row is None or row.tenant_id != tenant_id or row.deleted:
        raise not_found("file", file_id, param="file_id")
    return row


def processed_fine_tune_file(session: Session, tenant_id: str, file_id: str, param: str, *,
                             missing: type[DomainError] = InvalidRequest) -> File:
    """The tenant's processed fine-tune file; a missing one raises `missing` (400 in a request body, where
    OpenAI answers 400; 404 where the id is the thing looked up)."""
    file = session.get(File, file_id) if storable(file_id) else None
    if file is None or file.tenant_id != tenant_id or file.deleted:
        raise missing(f"File '{file_id}' does not exist.", param=param, code="invalid_file")
    if file.purpose != "fine-tune":
        raise InvalidRequest(f"File '{file_id}' has purpose '{file.purpose}'; fine-tuning needs purpose 'fine-tune'.",
                             param=param, code="invalid_file")
    if file.status != FileStatus.processed:
        raise InvalidRequest(f"File '{file_id}' is not processed (status '{file.status}'); only processed "
                             "files can be used.", param=param, code="invalid_file")
    return file


def preview_file(session: Session, *, tenant_id: str, settings: Settings, file_id: str,
                 limit: int) -> list[dict[str, Any]]:
    """The first `limit` examples of a stored file with their line numbers (only the head is read)."""
    get_file(session, tenant_id=tenant_id, file_id=file_id)
    rows: list[dict[str, Any]] = []
    with ArtifactStore.for_settings(settings).local_file(file_id).open("rb") as stored:
        for number, raw in enumerate(stored, start=1):
            if len(rows) >= limit:
                break
            if raw.strip():  # stored files passed validation: every non-blank line is a JSON object
                rows.append({"line": number, "example": json.loads(raw.decode("utf-8").removeprefix("\ufeff"))})
    return rows


def list_files(session: Session, *, tenant_id: str, purpose: str | None, limit: int,
               after: str | None) -> tuple[list[File], bool]:
    query = select(File).where(File.tenant_id == tenant_id, File.deleted.is_(False))
    if purpose and not storable(purpose):
        return [], False
    if purpose:
        query = query.where(File.purpose == purpose)
    if after:
        anchor = get_file(session, tenant_id=tenant_id, file_id=after)
        query = query.where((File.created_at < anchor.created_at)
                            | ((File.created_at == anchor.created_at) & (File.id < anchor.id)))
    rows = list(session.scalars(query.order_by(File.created_at.desc(), File.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, *, tenant_id: str, settings: Settings, file_id: str) -> File:
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    active = session.scalar(select(FineTuningJob.id).where(
        (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id),
        FineTuningJob.status.in_([JobStatus.validating_files, JobStatus.queued, JobStatus.running,
                                  JobStatus.paused])))
    if active:
        raise Conflict(f"File '{file_id}' is used by fine-tuning job '{active}', which has not finished (a paused "
                       "job resumes from it); cancel the job or wait for it first.", param="file_id",
                       code="file_in_use")
    evaluating = evaluations.unfinished_using_file(session, file_id)
    if evaluating:
        raise Conflict(f"File '{file_id}' is used by evaluation '{evaluating}', which has not finished; wait for it "
                       "first.", param="file_id", code="file_in_use", retry_after=10)
    row.deleted = True
    session.commit()
    ArtifactStore.for_settings(settings).delete_file(file_id)
    return row
