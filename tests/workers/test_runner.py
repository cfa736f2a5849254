"""The job runner with real parts: a real SQLite database (app.db.session), the real training loop and the
tiny model, run in-process through the Celery task `train(job_id)`. Every statement the database driver
receives is counted, so these tests measure the database traffic of a training step.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from adapters.store import ArtifactStore
from app.db import session as db_session
from app.db.models import FineTuningJob
from app.services import datasets, jobs, tenants
from app.settings import Settings, get_settings
from tests.conftest import MODEL_CACHE, chat_lines, reset_process_state
from tests.tiny_model import TINY_MODEL_ID

TENANT = "default"
# What a training step may cost: its metrics event (jobs.add_event: the job's tenant, then the INSERT), as
# before, and the cancel/pause check and the progress write at most once a second each, whatever the step time.
METRICS_EVENT_STATEMENTS = 2
AT_MOST_EVERY_SECONDS = 1.0


@pytest.fixture()
def configure(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[..., Settings]]:
    """Settings for an in-process worker on a fresh SQLite database; keyword arguments add ADAPTERY_* values."""

    def apply(**extra: str) -> Settings:
        env = {
            "DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": "", "BROKER_URL": "",
            "MODEL_CACHE_DIR": str(MODEL_CACHE), "BASE_MODELS": json.dumps({TINY_MODEL_ID: str(tiny_model_dir)}),
            "DEFAULT_BASE_MODEL": TINY_MODEL_ID, "TORCH_THREADS": "1", "LOG_EVERY_STEPS": "1",
            # No periodic checkpoints (the one at the end of the epoch falls after the measured steps), and
            # no lease renewal while the tests run (it is a thread's, every lease_seconds / 3, not a step's).
            "CHECKPOINT_STEPS": "0", "LEASE_SECONDS": "600", "FAULT_INJECTION": "", **extra,
        }
        for key, value in env.items():
            monkeypatch.setenv(f"ADAPTERY_{key}", value)
        reset_process_state()
        db_session.migrate_to_head()
        return get_settings()

    yield apply
    reset_process_state()


def submit(settings: Settings, n_examples: int) -> str:
    """A queued LoRA job of n_examples steps (batch size 1, one epoch), made through the service functions."""
    with db_session.session_scope() as session:
        tenants.create_tenant(session, name="tests", tenant_id=TENANT)
        content = chat_lines(n_examples).encode()
        with ArtifactStore.for_settings(settings).new_upload() as (path, handle):
            handle.write(content)
            handle.flush()
            file = datasets.create_file(session, tenant_id=TENANT, settings=settings, filename="train.jsonl",
                                        purpose="fine-tune", upload=path, size=len(content))
        job = jobs.create_job(session, tenant_id=TENANT, settings=settings, model=TINY_MODEL_ID,
                              training_file=file.id, validation_file=None, suffix=None, seed=3, metadata=None,
                              method_type="lora", raw_hyperparameters={"n_epochs": 1, "batch_size": 1},
                              hyperparameter_param="method.lora.hyperparameters")
        return job.id


def run_task(job_id: str) -> str:
    from workers.tasks import train

    return str(train(job_id))


def job_row(job_id: str) -> FineTuningJob:
    with db_session.session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


@dataclass
class Statement:
    at: float
    sql: str
    parameters: Any

    @property
    def is_metrics_event(self) -> bool:
        values = self.parameters.values() if isinstance(self.parameters, dict) else self.parameters
        return self.sql.startswith("INSERT INTO job_events") and "metrics" in values

    @property
    def is_stop_check(self) -> bool:
        return self.sql.startswith("SELECT fine_tuning_jobs.cancel_requested")

    @property
    def is_progress_write(self) -> bool:
        return self.sql.startswith("UPDATE fine_tuning_jobs SET progress_step")


class StatementLog:
    """Every statement SQLAlchemy sends to the database while open (any thread)."""

    def __init__(self) -> None:
        self.engine = db_session.get_engine()
        self.statements: list[Statement] = []

    def _record(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
                _executemany: bool) -> None:
        self.statements.append(Statement(time.monotonic(), statement.strip(), parameters))

    def __enter__(self) -> StatementLog:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *_: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def metrics_events(self) -> list[Statement]:
        return [s for s in list(self.statements) if s.is_metrics_event]


@dataclass
class StepTraffic:
    steps: int
    seconds: float
    statements: int
    stop_checks: int
    progress_writes: int

    @property
    def per_step(self) -> float:
        return self.statements / self.steps

    @property
    def others(self) -> int:
        return self.statements - self.stop_checks - self.progress_writes


def step_traffic(log: StatementLog) -> StepTraffic:
    """The statements of whole training steps: those after the first step's metrics event, up to and
    including the last step's (start-up before and the finish after are not steps' traffic)."""
    marks = [i for i, s in enumerate(log.statements) if s.is_metrics_event]
    assert len(marks) >= 10, "too few steps to measure"
    window = log.statements[marks[0] + 1:marks[-1] + 1]
    return StepTraffic(steps=len(marks) - 1, seconds=log.statements[marks[-1]].at - log.statements[marks[0]].at,
                       statements=len(window), stop_checks=sum(s.is_stop_check for s in window),
                       progress_writes=sum(s.is_progress_write for s in window))


@pytest.mark.parametrize(("step_delay", "steps"), [(0.0, 80), (0.15, 30)], ids=["fast-steps", "slow-steps"])
def test_a_training_step_costs_a_bounded_number_of_statements(configure: Callable[..., Settings], step_delay: float,
                                                              steps: int) -> None:
    settings = configure(FAULT_INJECTION=f"step_delay={step_delay}" if step_delay else "")
    job_id = submit(settings, steps)
    with StatementLog() as log:
        assert run_task(job_id) == "done"
    traffic = step_traffic(log)
    print(f"\n{step_delay=}: {traffic.steps} steps in {traffic.seconds:.2f} s ({traffic.seconds / traffic.steps:.3f} "
          f"s each): {traffic.statements} statements, {traffic.per_step:.2f} per step ({traffic.stop_checks} "
          f"stop checks, {traffic.progress_writes} progress writes, {traffic.others} others)")
    polls_allowed = traffic.seconds / AT_MOST_EVERY_SECONDS + 1
    assert traffic.stop_checks <= polls_allowed, traffic
    assert traffic.progress_writes <= polls_allowed, traffic
    assert traffic.others <= METRICS_EVENT_STATEMENTS * traffic.steps, traffic
    assert traffic.per_step <= METRICS_EVENT_STATEMENTS + 2 * polls_allowed / traffic.steps, traffic
    # Metrics events as before: one per step. The last step's progress is recorded before the job succeeds.
    assert len(log.metrics_events()) == steps
    job = job_row(job_id)
    assert job.status == "succeeded" and job.progress_step == job.progress_total_steps == steps


def test_a_pause_is_seen_within_about_a_second_and_progress_shows_where_it_stopped(
        configure: Callable[..., Settings]) -> None:
    settings = configure(FAULT_INJECTION="step_delay=0.15")
    job_id = submit(settings, 60)
    requested_at: list[float] = []

    def pause_after_a_few_steps() -> None:
        deadline = time.monotonic() + 120
        while len(log.metrics_events()) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        with db_session.session_scope() as session:
            job = session.get(FineTuningJob, job_id)
            assert job is not None
            requested_at.append(time.monotonic())
            jobs.request_pause(session, job)

    with StatementLog() as log:
        pauser = threading.Thread(target=pause_after_a_few_steps)
        pauser.start()
        outcome = run_task(job_id)
        pauser.join()
    assert outcome == "paused" and requested_at
    trained = log.metrics_events()
    longest_step = max(b.at - a.at for a, b in zip(trained, trained[1:], strict=False))
    # The stop check runs between steps, at most a second apart: the last step trained began before it.
    assert trained[-1].at - requested_at[0] <= AT_MOST_EVERY_SECONDS + 2 * longest_step + 0.5
    job = job_row(job_id)
    assert job.status == "paused" and job.progress_step == len(trained) < job.progress_total_steps
    with db_session.session_scope() as session:
        checkpoints = jobs.list_checkpoints(session, job)
    assert [c.step_number for c in checkpoints] == [len(trained)]


def test_a_job_whose_from_model_is_not_its_tenants_fails_before_training(configure: Callable[..., Settings]) -> None:
    """The worker resolves `from_model` again at run time, within the job's own tenant: a job whose source is not
    (or no longer) one of its tenant's ready adapters fails naming from_model, and never loads another tenant's
    weights (a public adapter is for inference; continuing it would export it)."""
    from sqlalchemy import select

    from app.db.models import Adapter

    settings = configure()
    trained = submit(settings, 2)
    assert run_task(trained) == "done"
    name = job_row(trained).fine_tuned_model
    with db_session.session_scope() as session:  # the model becomes another tenant's, made public by the admin
        tenants.create_tenant(session, name="other", tenant_id="other")
        source = session.scalar(select(Adapter).where(Adapter.name == name))
        assert source is not None
        source.tenant_id, source.public = "other", True
    # A job of this tenant that names it (made before the rule, or its own source since deleted).
    with db_session.session_scope() as session:
        job_id = jobs.create_job(session, tenant_id=TENANT, settings=settings, model=TINY_MODEL_ID,
                                 training_file=job_row(trained).training_file, validation_file=None, suffix=None,
                                 seed=3, metadata=None, method_type="lora", raw_hyperparameters={"n_epochs": 1},
                                 hyperparameter_param="method.lora.hyperparameters").id
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        job.from_model = name
    assert run_task(job_id) == "failed"
    job = job_row(job_id)
    assert (job.status, job.error_code, job.error_param) == ("failed", "from_model_unavailable", "from_model")
    assert f"from_model '{name}'" in (job.error_message or "") and job.progress_step == 0


def test_publishing_reuses_only_the_jobs_own_tenants_adapter(configure: Callable[..., Settings]) -> None:
    """Names are per tenant: another tenant's adapter under the job's fine-tuned model name is not this job's
    result (it used to be reused, giving the job that tenant's weights and its tenant a model it cannot see)."""
    from sqlalchemy import select

    from app.db.models import Adapter

    settings = configure()
    job_id = submit(settings, 2)
    name = jobs.fine_tuned_model_name(TINY_MODEL_ID, None, job_id)
    with db_session.session_scope() as session:
        tenants.create_tenant(session, name="other", tenant_id="other")
        session.add(Adapter(id="adapter-others", tenant_id="other", name=name, base_model=TINY_MODEL_ID,
                            method="lora", job_id=None, status="ready"))
    assert run_task(job_id) == "done"
    with db_session.session_scope() as session:
        owners = {a.tenant_id: a.id for a in session.scalars(select(Adapter).where(Adapter.name == name))}
    assert owners.keys() == {"other", TENANT} and owners["other"] == "adapter-others"
