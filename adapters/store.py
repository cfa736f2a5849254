"""Artifact store: uploaded dataset files, checkpoints and adapters under the data dir, and, when an object
store is configured (ADAPTERY_ARTIFACT_STORE_URL=s3://bucket/prefix), mirrored to it so that every host sees
them: the data dir is then each host's working copy, filled from the object store on first use.

Publishing keeps its all-or-nothing meaning in both places: locally a folder is written under a temporary
name and renamed into place; in the object store each file is uploaded with its MD5 (S3 refuses a body
that does not match it) and its size is read back, and only then is a COMPLETE marker written. A reader takes an
adapter or checkpoint only when its marker is there, so a crash mid-upload is never served or resumed from.

Every path is built from ids this service generated, never from a name a client chose, and
adapters are kept as safetensors plus a JSON config only (nothing here is ever unpickled).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# Written last into an adapter's or a checkpoint's folder (local or remote): the rest is whole.
COMPLETE = "COMPLETE"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STEP = re.compile(r"^step-\d{8}$")


def _checked(identifier: str) -> str:
    if not _ID.match(identifier):
        raise ValueError(f"not a store id: {identifier!r}")
    return identifier


class IncompleteArtifact(FileNotFoundError):
    """The object store holds part of an artifact (no COMPLETE marker): a publish that did not finish."""


class ObjectStore:
    """An S3-compatible bucket (AWS, MinIO, Ceph, ...) through boto3; credentials and region come from boto3's
    usual sources (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, instance roles)."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ValueError(f"ADAPTERY_ARTIFACT_STORE_URL must look like s3://bucket or s3://bucket/prefix, "
                             f"got {url!r}")
        self.bucket, _, prefix = url[5:].partition("/")
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self._clients: dict[int, Any] = {}

    @property
    def client(self) -> Any:
        # One client per process: boto3 clients are thread-safe but must not cross a fork.
        pid = os.getpid()
        if pid not in self._clients:
            import boto3

            self._clients = {pid: boto3.client("s3", endpoint_url=self.endpoint_url)}
        return self._clients[pid]

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def put(self, relative: str, path: Path) -> None:
        """Upload a file with its MD5 (S3 refuses a body damaged on the way), then read its size back."""
        digest = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        with path.open("rb") as handle:
            self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=handle,
                                   ContentMD5=base64.b64encode(digest.digest()).decode())
        # (Not the ETag: with server-side KMS encryption it is no MD5.)
        stored = self.client.head_object(Bucket=self.bucket, Key=self.key(relative))["ContentLength"]
        if stored != path.stat().st_size:
            raise OSError(f"the object store holds {stored} bytes of {relative}; {path.stat().st_size} were sent")

    def put_bytes(self, relative: str, content: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=content)

    def get(self, relative: str, path: Path) -> None:
        """Download to `path` atomically (a temporary name, then a rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".download-")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self.key(relative), tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, relative: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(relative))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def names(self, relative_prefix: str) -> list[str]:
        """Keys under a folder, relative to it."""
        start = self.key(relative_prefix.rstrip("/") + "/")
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            found.extend(item["Key"][len(start):] for item in page.get("Contents", []))
        return found

    def delete_one(self, relative: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(relative))

    def delete(self, relative_prefix: str) -> None:
        """Everything under a folder, its COMPLETE marker first (a reader then stops taking it at once)."""
        names = sorted(self.names(relative_prefix), key=lambda name: not name.endswith(COMPLETE))
        for name in names:
            self.delete_one(f"{relative_prefix}/{name}")


_OBJECT_STORES: dict[tuple[str, str | None], ObjectStore] = {}


def _object_store(url: str, endpoint_url: str | None) -> ObjectStore:
    if (url, endpoint_url) not in _OBJECT_STORES:
        _OBJECT_STORES[(url, endpoint_url)] = ObjectStore(url, endpoint_url)
    return _OBJECT_STORES[(url, endpoint_url)]


class ArtifactStore:
    def __init__(self, root: Path, remote: ObjectStore | None = None):
        self.root = Path(root)
        self.remote = remote

    @classmethod
    def for_settings(cls, settings: Any) -> ArtifactStore:
        """The store the settings describe: the data dir, mirrored to ADAPTERY_ARTIFACT_STORE_URL when set."""
        url = getattr(settings, "artifact_store_url", "")
        remote = _object_store(url, getattr(settings, "s3_endpoint_url", None)) if url else None
        return cls(settings.data_dir, remote)

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{_checked(file_id)}.jsonl"

    def adapter_dir(self, adapter_id: str) -> Path:
        return self.root / "adapters" / _checked(adapter_id)

    def checkpoint_dir(self, job_id: str) -> Path:
        """Resumable training state of one job (see workers.training.checkpoints)."""
        return self.root / "checkpoints" / _checked(job_id)

    def tensorboard_dir(self, job_id: str) -> Path:
        """A job's training curves as TensorBoard event files (`tensorboard --logdir <data dir>/tensorboard`)."""
        return self.root / "tensorboard" / _checked(job_id)

    def write_file(self, file_id: str, content: bytes) -> Path:
        """Write atomically: a crash leaves either no file or the whole file."""
        path = self.file_path(file_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.remote is not None:
            self.remote.put(f"files/{path.name}", path)
        return path

    @contextlib.contextmanager
    def new_upload(self) -> Iterator[tuple[Path, IO[bytes]]]:
        """A temporary file beside the stored files, to stream an upload into (so it is never whole in memory) and
        then publish with `publish_file` (a rename on the same filesystem); removed on exit unless published."""
        folder = self.root / "files"
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
        path = Path(tmp)
        try:
            with os.fdopen(fd, "w+b") as handle:
                yield path, handle
        finally:
            path.unlink(missing_ok=True)

    def publish_file(self, file_id: str, upload: Path) -> Path:
        """Store a file written by `new_upload` under `file_id`, atomically as `write_file` does."""
        path = self.file_path(file_id)
        with upload.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(upload, path)
        if self.remote is not None:
            self.remote.put(f"files/{path.name}", path)
        return path

    def local_file(self, file_id: str) -> Path:
        """The file on this host, fetched from the object store first when another host stored it."""
        path = self.file_path(file_id)
        if not path.exists() and self.remote is not None:
            self.remote.get(f"files/{path.name}", path)
        return path

    def read_file(self, file_id: str) -> bytes:
        return self.local_file(file_id).read_bytes()

    def delete_file(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)
        if self.remote is not None:
            self.remote.delete_one(f"files/{_checked(file_id)}.jsonl")

    def staging_dir(self) -> Path:
        """A fresh temp dir on the same filesystem as the adapters, for atomic publish()."""
        base = self.root / "adapters"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=base))

    def publish_adapter(self, staging: Path, adapter_id: str) -> Path:
        """Move a fully written adapter folder into place (rename is atomic on one filesystem)."""
        for name in ADAPTER_FILES:
            if not (staging / name).is_file():
                raise FileNotFoundError(f"adapter is missing {name}")
        target = self.adapter_dir(adapter_id)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        if self.remote is not None:
            self._upload_folder(target, f"adapters/{adapter_id}", ADAPTER_FILES)
        return target

    def fetch_adapter(self, adapter_id: str) -> Path:
        """The adapter's folder on this host; from the object store when another host published it (only a
        completely published one: IncompleteArtifact otherwise)."""
        target = self.adapter_dir(adapter_id)
        if self.remote is None or all((target / name).is_file() for name in ADAPTER_FILES):
            return target
        self._download_folder(f"adapters/{adapter_id}", target, ADAPTER_FILES)
        return target

    def publish_checkpoint(self, job_id: str, folder: Path) -> None:
        """Mirror a checkpoint folder written locally (workers.training.checkpoints.save) to the object store."""
        if self.remote is None:
            return
        names = tuple(sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != COMPLETE))
        self._upload_folder(folder, f"checkpoints/{_checked(job_id)}/{folder.name}", names)

    def fetch_checkpoint(self, job_id: str, step_name: str | None = None) -> None:
        """Bring a job's newest complete checkpoint in the object store (or the one named `step-<n>`) to this
        host, unless it is here already: a job resumes where it stopped whichever host runs it next."""
        if self.remote is None:
            return
        prefix = f"checkpoints/{_checked(job_id)}"
        complete = sorted({name.split("/")[0] for name in self.remote.names(prefix)
                           if name.endswith(f"/{COMPLETE}") and _STEP.match(name.split("/")[0])})
        if step_name is not None:
            complete = [name for name in complete if name == step_name]
        if not complete:
            return
        target = self.checkpoint_dir(job_id) / complete[-1]
        if (target / COMPLETE).is_file():
            return
        names = tuple(n for n in self.remote.names(f"{prefix}/{complete[-1]}") if "/" not in n and n != COMPLETE)
        # Marked complete locally too, as checkpoints.save marks the ones it writes.
        self._download_folder(f"{prefix}/{complete[-1]}", target, names, mark_complete=True)

    def _upload_folder(self, folder: Path, relative: str, names: tuple[str, ...]) -> None:
        assert self.remote is not None
        for name in names:
            self.remote.put(f"{relative}/{name}", folder / name)
        self.remote.put_bytes(f"{relative}/{COMPLETE}", b"ok\n")  # last: the rest is verified and whole

    def _download_folder(self, relative: str, target: Path, names: tuple[str, ...], *,
                         mark_complete: bool = False) -> None:
        assert self.remote is not None
        if not self.remote.exists(f"{relative}/{COMPLETE}"):
            raise IncompleteArtifact(f"{relative} is not completely published in the object store")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetching-", dir=target.parent))
        try:
            for name in names:
                self.remote.get(f"{relative}/{name}", staging / name)
            if mark_complete:
                (staging / COMPLETE).write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def adapter_size(self, adapter_id: str) -> int:
        return sum(p.stat().st_size for p in self.adapter_dir(adapter_id).iterdir() if p.is_file())

    def delete_adapter(self, adapter_id: str) -> None:
        shutil.rmtree(self.adapter_dir(adapter_id), ignore_errors=True)
        if self.remote is not None:
            self.remote.delete(f"adapters/{_checked(adapter_id)}")
