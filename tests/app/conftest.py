"""A migrated database per test, on each of the two backends the service runs on: SQLite (the embedded mode)
and PostgreSQL (the scaled deployment). The schema is migrated once per module and backend, then copied for
each test: a file copy on SQLite, `CREATE DATABASE … TEMPLATE` on PostgreSQL."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import session as db_session
from app.settings import Settings
from tests.conftest import postgres_database

# SQLite in the fast tier; PostgreSQL needs a server, so its runs are in the end-to-end tier.
BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql", marks=pytest.mark.e2e)]


def _migrate(url: str, folder: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        # migrate_to_head makes the settings' data dir: point it at the test's folder, not the checkout.
        patch.setattr(db_session, "get_settings", lambda: Settings(data_dir=folder))
        db_session.migrate_to_head(url)


@pytest.fixture(scope="module", params=BACKENDS)
def migrated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The backend's name and where its migrated template is: a SQLite file's path or a PostgreSQL database name."""
    folder = tmp_path_factory.mktemp("db-template")
    if request.param == "sqlite":
        path = folder / "template.db"
        _migrate(f"sqlite:///{path}", folder)
        yield f"sqlite:{path}"
        return
    with postgres_database(request.getfixturevalue("postgres_admin_url")) as url:
        _migrate(url, folder)
        yield f"postgresql:{url.rsplit('/', 1)[1]}"


@pytest.fixture()
def database(migrated: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a fresh copy of the migrated template."""
    backend, template = migrated.split(":", 1)
    if backend == "sqlite":
        path = tmp_path / "adaptery.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    with postgres_database(request.getfixturevalue("postgres_admin_url"), template=template) as url:
        yield url


@pytest.fixture()
def engine(database: str) -> Iterator[Engine]:
    engine = db_session.make_engine(database)  # the app's own engine setup (WAL and busy timeout on SQLite)
    yield engine
    engine.dispose()


@pytest.fixture()
def session(engine: Engine) -> Iterator[Session]:
    with sessionmaker(bind=engine, expire_on_commit=False)() as opened:
        yield opened


@pytest.fixture()
def other(engine: Engine) -> Iterator[Session]:
    """A second session on the same database: another process (a second worker, the API, the reaper)."""
    with sessionmaker(bind=engine, expire_on_commit=False)() as opened:
        yield opened
