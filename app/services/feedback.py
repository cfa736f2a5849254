"""Feedback datasets: preference and feedback lines a tenant collects one judgement at a time (the playground's
"this answer is better" and thumbs up / down), appended to a stored file that DPO, ORPO, SimPO and KTO jobs train on.

Stored files never change once stored (a job that named one reads what it named). An append therefore stores a new
file with every line so far plus the new ones, through the upload path's own checks, and moves the dataset to it
with a guarded UPDATE on its version; two appends at once cannot both win, and the loser tries again on the
winner's file. A file the dataset has moved past is deleted one append later (unless a job or evaluation that has
not finished names it), so a job created from the dataset's current file never races with that file's deletion.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapters.data import DatasetError, check_record, detect_format
from adapters.store import ArtifactStore
from app.db.models import FeedbackDataset, File, now
from app.errors import Conflict, DomainError, InvalidRequest
from app.services import datasets, tokenizers
from app.settings import Settings

COLLECTED_FORMATS = ("preference", "feedback")
MAX_LINES_PER_APPEND = 16
ATTEMPTS = 3


def _format_of(lines: list[dict[str, Any]]) -> str:
    """The lines' one format (preference or feedback), each line checked as an upload checks it."""
    formats = set()
    for i, line in enumerate(lines):
        fmt = detect_format(line)
        if fmt not in COLLECTED_FORMATS:
            raise InvalidRequest(f"lines[{i}] must be a preference line ({{input, preferred_output, "
                                 "non_preferred_output}) or a feedback line ({input, output, label}).",
                                 param=f"lines[{i}]", code="invalid_line")
        problem = check_record(line, fmt)
        if problem:
            raise InvalidRequest(f"lines[{i}]: {problem}", param=f"lines[{i}]", code="invalid_line")
        formats.add(fmt)
    if len(formats) > 1:
        raise InvalidRequest("lines mix preference and feedback lines; a dataset holds one format, so send them to "
                             "two datasets.", param="lines", code="invalid_line")
    return formats.pop()


def append(session: Session, *, tenant_id: str, settings: Settings, name: str,
           lines: list[dict[str, Any]]) -> FeedbackDataset:
    """Append the lines to the tenant's dataset `name` (made on its first lines) and return it."""
    fmt = _format_of(lines)
    _check_lengths(settings, lines, fmt)
    store = ArtifactStore.for_settings(settings)
    for _ in range(ATTEMPTS):
        session.expire_all()  # read the dataset as it is now, not as an earlier attempt saw it
        current = session.get(FeedbackDataset, (tenant_id, name))
        if current is not None and current.format != fmt:
            raise InvalidRequest(f"Dataset '{name}' holds {current.format} lines; these are {fmt} lines. Send them "
                                 "to a dataset of their own.", param="lines", code="invalid_line")
        seen = (current.file_id, current.previous_file_id, current.version) if current is not None else None
        # A current file its owner deleted (DELETE /v1/files) took the lines with it: the dataset starts over.
        kept = seen[0] if seen is not None and _stored(session, seen[0]) else None
        try:
            stored = _store_with(session, store, tenant_id=tenant_id, settings=settings, name=name, previous=kept,
                                 lines=lines)
        except FileNotFoundError:
            continue  # another append moved the dataset on and retired the file read here
        if _move(session, tenant_id=tenant_id, name=name, fmt=fmt, seen=seen, file_id=stored.id):
            if seen is not None and seen[1] is not None:
                _retire(session, tenant_id=tenant_id, settings=settings, file_id=seen[1])
            dataset = session.get(FeedbackDataset, (tenant_id, name))
            assert dataset is not None
            return dataset
        # Another append moved the dataset first: ours holds its lines without the winner's, so it goes.
        datasets.delete_file(session, tenant_id=tenant_id, settings=settings, file_id=stored.id)
    raise Conflict(f"Dataset '{name}' is being appended to by other requests; try again.", param="dataset",
                   code="dataset_busy", retry_after=1)


def _stored(session: Session, file_id: str) -> bool:
    row = session.get(File, file_id)
    return row is not None and not row.deleted


def _check_lengths(settings: Settings, lines: list[dict[str, Any]], fmt: str) -> None:
    """Each new line within the per-example token limit, named as lines[i] (an upload names its line)."""
    from adapters.data import ParsedDataset, check_lengths, encode_any

    dataset = ParsedDataset(format=fmt, records=lines, line_numbers=list(range(len(lines))))  # type: ignore[arg-type]
    try:
        examples = encode_any(tokenizers.default(settings), dataset)
    except DatasetError as exc:
        number, problem = exc.problems[0]
        raise InvalidRequest(f"lines[{number}]: {problem}", param=f"lines[{number}]", code="invalid_line") from None
    problems = check_lengths(examples, dataset.line_numbers, max_tokens=settings.max_example_tokens)
    if problems:
        number, problem = problems[0]
        raise InvalidRequest(f"lines[{number}]: {problem}", param=f"lines[{number}]", code="invalid_line")


def _store_with(session: Session, store: ArtifactStore, *, tenant_id: str, settings: Settings, name: str,
                previous: str | None, lines: list[dict[str, Any]]) -> File:
    """A new stored file: the previous file's lines, then these, checked as an upload is."""
    with store.new_upload() as (path, handle):
        if previous is not None:
            with store.local_file(previous).open("rb") as old:
                shutil.copyfileobj(old, handle)
            if handle.tell():
                handle.seek(-1, 2)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        handle.flush()
        size = handle.tell()
        if size > settings.max_upload_mb * 2**20:
            raise InvalidRequest(f"Dataset '{name}' would be larger than the {settings.max_upload_mb} MB a file may "
                                 "be (ADAPTERY_MAX_UPLOAD_MB); collect into a new dataset.", param="dataset",
                                 code="dataset_full")
        try:
            return datasets.create_file(session, tenant_id=tenant_id, settings=settings, filename=f"{name}.jsonl",
                                        purpose="fine-tune", upload=path, size=size)
        except InvalidRequest as exc:  # a whole-file limit (examples, tokens per file): each line passed alone
            raise InvalidRequest(f"Dataset '{name}' cannot take these lines: {exc.message}", param="dataset",
                                 code="dataset_full") from None


def _move(session: Session, *, tenant_id: str, name: str, fmt: str, seen: tuple[str, str | None, int] | None,
          file_id: str) -> bool:
    """Point the dataset at `file_id` if nobody moved it since it was read as (file, previous file, version) `seen`
    (None: it did not exist); the file it pointed at becomes its previous file, to retire on the next append."""
    if seen is None:
        session.add(FeedbackDataset(tenant_id=tenant_id, name=name, format=fmt, file_id=file_id, version=1,
                                    updated_at=now()))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            return False
        return True
    result = session.execute(update(FeedbackDataset).where(
        FeedbackDataset.tenant_id == tenant_id, FeedbackDataset.name == name,
        FeedbackDataset.version == seen[2]).values(file_id=file_id, previous_file_id=seen[0], version=seen[2] + 1,
                                                   updated_at=now()))
    session.commit()
    session.expire_all()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _retire(session: Session, *, tenant_id: str, settings: Settings, file_id: str) -> None:
    """Delete a file the dataset moved past, unless a job or evaluation that has not finished uses it (it stays,
    listed, and its owner may delete it later) or its owner deleted it already."""
    try:
        datasets.delete_file(session, tenant_id=tenant_id, settings=settings, file_id=file_id)
    except DomainError:
        session.rollback()


def list_datasets(session: Session, *, tenant_id: str) -> list[FeedbackDataset]:
    return list(session.scalars(select(FeedbackDataset).where(FeedbackDataset.tenant_id == tenant_id)
                                .order_by(FeedbackDataset.updated_at.desc(), FeedbackDataset.name)))


def dataset_object(dataset: FeedbackDataset, file: File | None) -> dict[str, Any]:
    return {"object": "feedback_dataset", "name": dataset.name, "format": dataset.format, "file": dataset.file_id,
            "n_examples": file.n_examples if file is not None else None, "version": dataset.version,
            "updated_at": dataset.updated_at}
