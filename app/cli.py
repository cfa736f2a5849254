"""The `adaptery` command: prepare the default model, run the API with a worker, or a worker alone; and the
client verbs on a running API (client_cli.py)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from app import client_cli, logs

cli = typer.Typer(help="Adaptery: self-hosted parameter-efficient fine-tuning.", no_args_is_help=True)
console = Console()


def worker_command(concurrency: int) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "app.queue:celery_app", "worker", "--loglevel=INFO",
            "--pool=prefork", f"--concurrency={concurrency}", "-n", f"worker-{os.getpid()}@%h"]


@cli.command("prepare-model")
def prepare_model() -> None:
    """Convert the packaged default base model to safetensors in the data dir (once)."""
    _prepare_default("base model", weights=True)


def prepare_tokenizer() -> None:
    """The default base model's tokenizer and config, without its weights (the API role's preparation)."""
    _prepare_default("tokenizer of", weights=False)


def _prepare_default(what: str, *, weights: bool) -> None:
    from app.services import base_models
    from app.settings import get_settings

    settings = get_settings()
    spec = base_models.resolve(settings, settings.default_base_model)
    started = time.monotonic()
    path = base_models.local_path(settings, spec) if weights else base_models.metadata_path(settings, spec)
    console.print(f"[green]{what} {spec.id} ready[/] at {path} ({time.monotonic() - started:.1f} s)")


@cli.command("migrate")
def migrate() -> None:
    """Bring the database schema to the latest revision."""
    from app.db.session import migrate_to_head

    migrate_to_head()
    console.print("[green]database schema is up to date[/]")


@cli.command("reference")
def reference(check: bool = typer.Option(False, "--check", help="write nothing; exit 1 naming the pages that differ "
                                                                 "from what the code renders"),
              folder: Path | None = typer.Option(None, help="where the pages are (default: docs/reference of this "
                                                            "checkout)")) -> None:
    """Generate the reference pages (settings, method hyperparameters) from the code into docs/reference."""
    from app import reference as pages

    target = folder or pages.DEFAULT_FOLDER
    if check:
        stale = pages.stale(target)
        for name in stale:
            console.print(f"[red]stale:[/] {target / name}", highlight=False, soft_wrap=True)
        if stale:
            console.print(f"regenerate with `{pages.COMMAND}`", highlight=False)
            raise typer.Exit(1)
        console.print(f"[green]reference pages are up to date[/] in {target}", highlight=False, soft_wrap=True)
        return
    changed = pages.write(target)
    for name in changed:
        console.print(f"[green]wrote[/] {target / name}", highlight=False, soft_wrap=True)
    if not changed:
        console.print(f"reference pages were up to date in {target}", highlight=False, soft_wrap=True)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies, even by kill -9 (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# A supervised child that exits is started again after RESTART_PAUSE_S; one that lived less than CRASH_LOOP_S waits
# twice as long as the last time, up to RESTART_PAUSE_MAX_S.
RESTART_PAUSE_S, CRASH_LOOP_S, RESTART_PAUSE_MAX_S = 2.0, 30.0, 60.0


class Supervisor:
    """Keeps one child process running (the Celery worker, the serving engine): a child that crashes (killed,
    OOM) is started again, with the environment it was first given.

    A clean exit (status 0, e.g. a warm shutdown after SIGTERM) means someone stopped it on purpose.
    """

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.command = command
        self.env = dict(env if env is not None else os.environ)
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Its own process group: a Ctrl-C or group SIGTERM must reach only the child's main process
        # (through stop()); billiard deadlocks if a worker's pool children are signalled directly.
        return subprocess.Popen(self.command, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)

    def start(self) -> None:
        self.process = self._spawn()
        threading.Thread(target=self._watch, daemon=True, name=f"{self.name}-supervisor").start()

    def _watch(self) -> None:
        started, pause = time.monotonic(), RESTART_PAUSE_S
        while not self.stopping.wait(RESTART_PAUSE_S):
            with self.lock:
                if self.stopping.is_set() or self.process is None or self.process.poll() is None:
                    continue
                if self.process.returncode == 0:
                    console.print(f"[yellow]{self.name} stopped; not restarting it[/]")
                    return
                # A child that cannot start (a setting it refuses, no memory for the model) would otherwise be
                # restarted every two seconds for ever: one that dies young waits twice as long each time.
                pause = min(pause * 2, RESTART_PAUSE_MAX_S) if time.monotonic() - started < CRASH_LOOP_S \
                    else RESTART_PAUSE_S
                console.print(f"[yellow]{self.name} exited with {self.process.returncode}; starting a new one"
                              + (f" in {pause:.0f} s" if pause > RESTART_PAUSE_S else "") + "[/]")
            if pause > RESTART_PAUSE_S and self.stopping.wait(pause - RESTART_PAUSE_S):
                return
            with self.lock:
                if self.stopping.is_set():
                    return
                self.process, started = self._spawn(), time.monotonic()

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def loopback_port() -> int:
    """A free loopback port below the kernel's range for outgoing connections: no connection of this machine's can
    take it while the engine restarts on it."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in [*random.sample(range(max(1024, low // 2), max(1025, low)), 100), 0]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")


def engine_apart(settings: Any) -> tuple[Supervisor, dict[str, str]]:
    """Role all with ADAPTERY_INFERENCE_PROCESS: the serving engine as role inference on a free loopback port, and
    the settings that make this process role api in front of it (a fresh internal key unless one is set)."""
    import secrets

    port = loopback_port()
    key = settings.internal_key or secrets.token_urlsafe(32)
    engine_env = {**os.environ, "ADAPTERY_ROLE": "inference", "ADAPTERY_HOST": "127.0.0.1",
                  "ADAPTERY_PORT": str(port), "ADAPTERY_INTERNAL_KEY": key}
    command = [sys.executable, "-m", "app.cli", "serve", "--role", "inference", "--no-migrate", "--quiet"]
    api_env = {"ADAPTERY_ROLE": "api", "ADAPTERY_INFERENCE_URLS": f"http://127.0.0.1:{port}",
               "ADAPTERY_INTERNAL_KEY": key}
    return Supervisor("serving engine", command, engine_env), api_env


@cli.command("serve")
def serve(with_worker: bool = typer.Option(True, help="also run a Celery worker process (role all only)"),
          migrate: bool = typer.Option(True, help="bring the schema to head first (replicas: leave it to one "
                                                  "`adaptery migrate`)"),
          role: str = typer.Option("", help="all (API, engine and console on one machine; the engine in a "
                                            "supervised process of its own unless ADAPTERY_INFERENCE_PROCESS=false), "
                                            "api (no engine: inference forwarded to ADAPTERY_INFERENCE_URLS) or "
                                            "inference (the engine); default ADAPTERY_ROLE, else all"),
          quiet: bool = typer.Option(False, "--quiet", hidden=True,
                                     help="no banner, no access log (role all's engine: the process in front logs)"),
          ) -> None:
    """Run the API (and a supervised Celery worker) on the configured host and port."""
    import uvicorn

    from app.db.session import migrate_to_head
    from app.settings import get_settings

    if role:
        if role not in ("all", "api", "inference"):
            raise typer.BadParameter("accepted: all, api, inference", param_hint="--role")
        os.environ["ADAPTERY_ROLE"] = role  # read by the app uvicorn imports below
        get_settings.cache_clear()
    settings = get_settings()
    # The handler the app's own set-up finds and keeps: one line per record, in ADAPTERY_LOG_FORMAT, from the start.
    logs.configure(settings.log_format, settings.log_level)
    with_worker = with_worker and settings.role == "all"
    share_metrics(settings, fresh=True)
    # The worker's environment as it is: role all (it trains and evaluates).
    children = [Supervisor("worker", worker_command(settings.worker_concurrency))] if with_worker else []
    engine_url = ""
    if settings.role == "all" and settings.inference_process:
        # The decode loop holds the interpreter lock between its torch calls; in a process of its own, no request
        # of the API's waits for it (bench/noisy_neighbour.py). This process becomes role api in front of it, from
        # here on: it never imports torch, and the engine converts the model's weights if they are not yet.
        engine, api_env = engine_apart(settings)
        children.append(engine)
        os.environ.update(api_env)
        get_settings.cache_clear()
        engine_url = api_env["ADAPTERY_INFERENCE_URLS"]
    if migrate:
        migrate_to_head()
    if get_settings().role == "api":
        prepare_tokenizer()  # the API role never converts weights (nor imports torch): its tokenizer is all it needs
    else:
        prepare_model()
    from app.db.session import session_scope
    from app.services.tenants import bootstrap

    with session_scope() as session:
        created = bootstrap(session, data_dir=settings.data_dir, explicit_key=settings.bootstrap_key)
    key_file = settings.data_dir / "bootstrap_key"
    for child in children:
        child.start()
    if not quiet:
        print_banner(settings, created, key_file, engine_url)
    # uvicorn re-raises SIGTERM after its shutdown; exiting through SystemExit lets `finally` stop the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if quiet:
        # Role all's engine answers only the process in front of it, which logs every request itself.
        # (A filter: uvicorn's own logging set-up and the app's both rewire that logger's handlers, not its filters.)
        logging.getLogger("uvicorn.access").addFilter(lambda _record: False)
    try:
        uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level="info")
    finally:
        for child in reversed(children):
            child.stop()


def print_banner(settings: Any, created: str | None, key_file: Path, engine_url: str) -> None:
    """Where to connect, and the local tenant's key the first time (at a terminal only)."""
    base = f"http://{settings.host}:{settings.port}"
    broker = "embedded (SQLite, no server)" if settings.uses_embedded_broker else settings.resolved_broker_url
    if settings.role == "inference":
        console.print(f"[bold green]Adaptery[/] inference replica on {base}  ·  OpenAI-compatible: {base}/v1")
    else:
        console.print(f"[bold green]Adaptery[/] console {base}/  ·  API docs {base}/docs  ·  broker: {broker}"
                      + (f"  ·  serving engine: a process of its own on {engine_url}" if engine_url else ""))
    if created and console.is_terminal:  # a person at a terminal; never into a collected log (a container's)
        console.print(f"API key of the local tenant (shown once; also in {key_file}): [bold]{created}[/]")
    elif key_file.exists():
        console.print(f"API key of the local tenant: in {key_file}")
    console.print(f"Try: curl -H \"Authorization: Bearer $(cat {key_file})\" {base}/v1/models"
                  if key_file.exists() else f"Send your key as 'Authorization: Bearer <key>' to {base}/v1/...")


@cli.command("worker")
def worker(concurrency: int = typer.Option(1, help="training processes in this worker")) -> None:
    """Run a Celery training worker in the foreground."""
    from app.db.session import schema_problem
    from app.settings import get_settings

    problem = schema_problem()
    if problem:
        console.print(f"[red]{problem}[/]")
        raise typer.Exit(2)
    share_metrics(get_settings(), fresh=False)
    os.execv(sys.executable, worker_command(concurrency))


def share_metrics(settings: Any, *, fresh: bool) -> None:
    """Point this process and its children at one Prometheus multiprocess folder (unless the environment
    names one already), so the API's /metrics sums every process's counters. `fresh`: the whole service
    starts here, so the previous run's files go."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    folder = settings.data_dir / "prometheus"
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


client_cli.register(cli)


def main() -> None:
    client_cli.run(cli)


if __name__ == "__main__":
    main()
