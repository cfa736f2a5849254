"""Engine and session factory, one per process; schema migration to head and the check that a process
starts only on the schema its code was written for."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # WAL lets the API read while a worker writes events; busy_timeout waits out short locks.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error (for workers and scripts)."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class SchemaOutOfDate(RuntimeError):
    """The database's schema is not the revision this release was written for."""


def _alembic_config(url: str | None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url or get_settings().resolved_database_url)
    return config


def migrate_to_head(url: str | None = None) -> None:
    """Bring the schema to the latest Alembic revision (idempotent)."""
    from alembic import command

    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(_alembic_config(url), "head")


def schema_problem(url: str | None = None) -> str | None:
    """None when the database is at this release's schema revision; else what is wrong and what to run.

    Serving processes check and refuse; only `adaptery migrate` (which `adaptery serve` runs first) changes the
    schema, so several replicas starting at once never race to migrate."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(_alembic_config(url))
    head = scripts.get_current_head()
    engine = make_engine(url) if url else get_engine()
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        if url:
            engine.dispose()
    if current == head:
        return None
    fix = "Run `adaptery migrate` with the same ADAPTERY_DATABASE_URL, then start again."
    if current is None:
        return f"The database has no Adaptery schema yet (this release needs revision {head}). {fix}"
    if current not in {script.revision for script in scripts.walk_revisions()}:
        return (f"The database schema is at revision {current}, which this release does not know (its newest is "
                f"{head}): a newer release migrated it. Run that release, or restore a backup.")
    return f"The database schema is at revision {current}; this release needs revision {head}. {fix}"


def require_current_schema() -> None:
    problem = schema_problem()
    if problem:
        raise SchemaOutOfDate(problem)
