"""A job's training curves as JSON, read from its metrics events: the database every host shares is the
truth (the TensorBoard files the worker also writes live on the worker's host only)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import JobEvent

# The scalars every job logs (workers/runner.py) in its metrics events, at the steps it logs.
CURVES = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy", "learning_rate",
          "grad_norm", "tokens_per_second",
          # Preference objectives (DPO): pairs ranked right and the mean reward margin, in place of token accuracy.
          "train_preference_accuracy", "train_reward_margin", "valid_preference_accuracy", "valid_reward_margin")


def downsampled(points: list[dict[str, Any]], max_points: int) -> tuple[list[dict[str, Any]], int]:
    """At most `max_points` of `points`: every k-th (k the smallest stride that fits) and the last, so a
    long job's curve keeps its shape and its final value without an answer that grows with the job."""
    if len(points) <= max_points:
        return points, 1
    stride = -(-(len(points) - 1) // (max_points - 1))
    kept = points[::stride]
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept, stride


def read(session: Session, job_id: str, *, from_step: int = 0, to_step: int | None = None) -> list[dict[str, Any]]:
    """One point per step in [from_step, to_step], in step order. A step logged twice (an attempt resumed
    from an earlier checkpoint trains it again) keeps its newest value."""
    points: dict[int, dict[str, Any]] = {}
    # Read in batches, not all rows at once: a long job has one metrics event per logged step.
    rows = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
                           .order_by(JobEvent.id).execution_options(yield_per=1000))
    for data in rows:
        step = (data or {}).get("step")
        if not isinstance(step, int) or step < from_step or (to_step is not None and step > to_step):
            continue
        points[step] = {"step": step, **{name: data[name] for name in CURVES
                                         if isinstance(data.get(name), int | float)}}
    return [points[step] for step in sorted(points)]
