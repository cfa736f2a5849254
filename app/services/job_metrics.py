"""A job's training curves: the scalars the worker writes as TensorBoard event files, read back as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters.store import ArtifactStore

# The scalars every job writes (workers/runner.py), under these tags, at the steps it logs.
CURVES = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy", "learning_rate",
          "grad_norm", "tokens_per_second")


def read(data_dir: Path, job_id: str, *, from_step: int = 0, to_step: int | None = None) -> list[dict[str, Any]]:
    """One point per step in [from_step, to_step], in step order. A step written twice (an attempt resumed
    from an earlier checkpoint trains it again) keeps its newest value."""
    folder = ArtifactStore(data_dir).tensorboard_dir(job_id)
    if not folder.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, dict[str, Any]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = set(accumulator.Tags().get("scalars", []))
        for name in CURVES:
            if name not in tags:
                continue
            for scalar in accumulator.Scalars(name):
                if scalar.step >= from_step and (to_step is None or scalar.step <= to_step):
                    points.setdefault(scalar.step, {"step": scalar.step})[name] = scalar.value
    return [points[step] for step in sorted(points)]
