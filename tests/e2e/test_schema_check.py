"""Serving processes start only on the schema their code was written for: an API or a worker on an empty or
out-of-date database exits with a message naming `adaptery migrate`, and never migrates by itself (several
replicas starting at once must not race to change the schema)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.budgets import budget
from tests.conftest import ROOT, stack_env
from tests.services import free_port


def previous_and_head() -> tuple[str, str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from app.db.session import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    scripts = ScriptDirectory.from_config(config)
    head = scripts.get_current_head()
    assert head is not None
    previous = scripts.get_revision(head).down_revision
    assert isinstance(previous, str)
    return previous, head


def run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget(timeout))


@pytest.fixture
def env(tmp_path: Path, tiny_model_dir: Path, redis_url: str) -> dict[str, str]:
    return stack_env(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'old.db'}", broker_url=redis_url,
                     tiny_model_dir=tiny_model_dir, port=free_port())


def test_api_and_worker_refuse_an_out_of_date_schema_until_it_is_migrated(env: dict[str, str]) -> None:
    previous, head = previous_and_head()
    api = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", env["ADAPTERY_PORT"]]
    worker = [sys.executable, "-m", "celery", "-A", "app.queue:celery_app", "worker", "--pool=solo"]

    empty = run(api, env, 60)
    assert empty.returncode != 0
    assert "no Adaptery schema yet" in empty.stderr and "adaptery migrate" in empty.stderr

    run([sys.executable, "-c", f"from alembic import command; from app.db.session import _alembic_config; "
                               f"command.upgrade(_alembic_config(None), {previous!r})"], env, 60).check_returncode()
    for command in (api, worker):
        refused = run(command, env, 90)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        output = refused.stdout + refused.stderr
        assert f"at revision {previous}; this release needs revision {head}" in output
        assert "adaptery migrate" in output
    cli_worker = run([sys.executable, "-m", "app.cli", "worker"], env, 60)
    assert cli_worker.returncode == 2 and "adaptery migrate" in cli_worker.stdout
    # Refusing changed nothing: the database is still at the previous revision.
    assert "this release needs" in run(api, env, 60).stderr

    run([sys.executable, "-m", "app.cli", "migrate"], env, 60).check_returncode()
    server = subprocess.Popen(api, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{env['ADAPTERY_PORT']}/health"
        for _ in range(int(budget(60) * 4)):
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, "the API exited on a migrated database"
            time.sleep(0.25)
        else:
            raise AssertionError("the API did not come up on the migrated database")
    finally:
        server.terminate()
        server.wait(timeout=30)
