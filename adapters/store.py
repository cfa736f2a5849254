"""Artifact store: uploaded dataset files, checkpoints and adapters under the data dir.

Every path is built from ids this service generated, never from a name a client chose, and
adapters are kept as safetensors plus a JSON config only (nothing here is ever unpickled).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _checked(identifier: str) -> str:
    if not _ID.match(identifier):
        raise ValueError(f"not a store id: {identifier!r}")
    return identifier


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

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
        return path

    def read_file(self, file_id: str) -> bytes:
        return self.file_path(file_id).read_bytes()

    def delete_file(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)

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
        return target

    def adapter_size(self, adapter_id: str) -> int:
        return sum(p.stat().st_size for p in self.adapter_dir(adapter_id).iterdir() if p.is_file())

    def delete_adapter(self, adapter_id: str) -> None:
        shutil.rmtree(self.adapter_dir(adapter_id), ignore_errors=True)
