"""Throwaway Redis and PostgreSQL servers for one test session: temporary directories, free ports,
stopped at the end. The suite touches no server of the machine's unless ADAPTERY_TEST_REDIS_URL /
ADAPTERY_TEST_POSTGRES_URL name one explicitly."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Debian/Ubuntu package names; the message a missing binary fails with.
INSTALL_HINT = "sudo apt-get install -y redis-server postgresql"


class MissingServer(RuntimeError):
    pass


# False while a fast-tier test runs (tests/conftest.py): starting a server then is a mistake in the test's tier.
servers_allowed = True


def _may_start(what: str) -> None:
    if not servers_allowed:
        raise RuntimeError(f"a fast-tier test asked for {what}: the fast tier starts no servers. Mark the test "
                           "e2e (pytest.mark.e2e) or move it to tests/e2e.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"server not listening on {port} after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def _wait_for_connection(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    """Listening is not accepting: PostgreSQL answers "starting up" for a moment after it binds."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                return
            except sa.exc.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not accept connections:\n"
                                       f"{log.read_text(errors='replace')[-3000:]}") from None
                time.sleep(0.1)
    finally:
        engine.dispose()


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def _server(prefix: str, command: Callable[[int, Path], list[str]]) -> Iterator[int]:
    """A server process on a free port with a scratch folder of its own; yields the port once it listens."""
    _may_start(prefix.strip("-"))
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    log = workdir / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command(port, workdir), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, log)
        yield port
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server on a free port with nothing on disk; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingServer(f"redis-server is not installed; install it with: {INSTALL_HINT}")
    with _server("adaptery-test-redis-", lambda port, workdir: [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]) as port:
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's standalone S3-compatible server (its own process, real HTTP) on a free port; yields its URL."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        raise MissingServer("moto_server is not installed: `make install` brings it (moto[server], a dev dependency)")
    with _server("adaptery-test-s3-", lambda port, _: [str(binary), "-H", "127.0.0.1", "-p", str(port)]) as port:
        yield f"http://127.0.0.1:{port}"


def postgres_bindir() -> Path:
    """Where initdb and postgres live: pg_config's answer, Debian's versioned folders, or PATH."""
    candidates: list[str] = []
    if shutil.which("pg_config"):
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             check=True).stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb") or "").resolve().parent))
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "postgres").exists():
            return Path(folder)
    raise MissingServer(f"PostgreSQL's server binaries (initdb, postgres) are not installed; install them with: "
                        f"{INSTALL_HINT}")


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root; then it runs as the `postgres` (or `nobody`) account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise MissingServer("running as root with no `postgres` or `nobody` account for PostgreSQL to run as")


@contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary folder on a free port (trust auth, no fsync); yields the admin URL."""
    _may_start("a PostgreSQL server")
    bindir = postgres_bindir()
    user = _server_user()
    workdir = Path(tempfile.mkdtemp(prefix="adaptery-test-postgres-"))
    data, log = workdir / "data", workdir / "postgres.log"
    if user is not None:
        account = pwd.getpwnam(user)
        os.chown(workdir, account.pw_uid, account.pw_gid)
    port = free_port()
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, user=user, cwd=workdir)
    with open(log, "wb") as out:
        if user is not None:
            os.chown(log, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        # Speed over durability: the cluster is thrown away at the end of the session.
        process = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                                    "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={workdir}",
                                    "-c", "fsync=off", "-c", "synchronous_commit=off",
                                    "-c", "full_page_writes=off", "-c", "max_connections=200"],
                                   stdout=out, stderr=subprocess.STDOUT, user=user, cwd=workdir)
    try:
        _wait_for_port(port, process, log)
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        _wait_for_connection(url, process, log)
        yield url
    finally:
        _stop(process, signal.SIGINT)  # PostgreSQL's "fast" shutdown: it does not wait for clients to leave
        shutil.rmtree(workdir, ignore_errors=True)
