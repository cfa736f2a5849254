"""Noisy neighbour (issue 21): tenant A misbehaves for a bounded time while tenant B does ordinary work; does B
notice?

The service runs as `make run` runs it: `adaptery serve` (role all: API and console, the serving engine in a
supervised process of its own, SQLite database, the embedded broker, and the supervised training worker, which also
sends webhooks and runs evaluations), on the default base model (SmolLM2-135M-Instruct) and every per-tenant limit
at its default. With `--topology one-process`, the same with the engine in the API's process
(ADAPTERY_INFERENCE_PROCESS=false), whose threads then share the interpreter lock with the decode loop. With
`--topology tiers`, the tiers started by hand on this machine: an API process (role api), an inference process
(role inference) and a worker.
The admin API creates tenants A and B; each imports LoRA adapters made with PEFT (POST /v1/adapters).

Tenant B, one request at a time, each timed, in rounds: list models (GET /v1/models), upload a small file
(POST /v1/files), a short chat on its own adapter (POST /v1/chat/completions, `--b-max-tokens` tokens, not
streamed), create a fine-tuning job on the file it just uploaded (POST /v1/fine_tuning/jobs; cancelled at once,
untimed, so that B stays under its active-jobs limit and the worker trains nothing of B's).

1. quiet: B alone, `--rounds` rounds (after `--warm-up` untimed ones).
2. under load: the same while tenant A, from another process (httpx async clients), keeps up at once:
   `--a-chats` non-streaming chats of `--a-max-tokens` tokens on its adapters (each restarted when it ends),
   `--a-streams` open event streams on a paused job of its own, a pin of each of its `--a-adapters` adapters
   (more than its pin quota), a burst of evaluations (`--a-eval-senders` senders, no pause between them), and
   webhook endpoints (as many as it may have, and more) pointing at a local server that accepts connections and
   never answers, with jobs created and cancelled in a loop so that deliveries to them are always due.
   Not in the default load, asked for by name (`--a-load chats,training`): one fine-tuning job of A's, 50 epochs
   of its file, that trains for the whole phase beside the API and the engine.
   A refusal (429, 503) of A's is expected and counted; A retries a refused request after its Retry-After (at
   least `REFUSAL_PAUSE_S`), as the OpenAI SDK does; with `--a-ignores-retry-after`, after `REFUSAL_PAUSE_S`
   whatever the answer said (a retry storm: the per-key rate limit is then what bounds A).

Reported per B action: p50 and p95 quiet and under load, the p95 ratio, and B's failures (any non-2xx of B's);
A's requests by status. Targets (issue 21): B's p95 under load at most 2x quiet for the control plane (models,
upload, create job) and 3x for chat, and no failure of B's.

The benchmark's clients run on the same cores as the service (A's in a process of its own, B's in this one).

    python -m bench.noisy_neighbour [--rounds 30] [--save]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, ROOT, hardware, md_table, median, percentile, ratio, rounded

MODEL = "SmolLM2-135M-Instruct"
DATASET = ROOT / "examples" / "sentiment_train.jsonl"
SMALL_FILE_LINES = 8
REFUSAL_PAUSE_S = 0.5  # A retries a refused request (429/503) after this: insistent, but not a busy loop
STREAM_OPEN_WAIT_S = 60.0  # how long A's streams may take to open before B starts anyway
# The load; "training" (one long fine-tuning job of A's) is asked for by name, to see what a job that trains
# beside the API and the engine costs B.
DEFAULT_ACTIVITIES = ("chats", "streams", "pins", "evaluations", "webhooks")
ACTIVITIES = (*DEFAULT_ACTIVITIES, "training")
B_ACTIONS = ("models", "upload", "chat", "create job")
TARGETS = {"models": 2.0, "upload": 2.0, "chat": 3.0, "create job": 2.0}  # p95 under load / p95 quiet, at most
# The limits that decide what A can take from B; all at their defaults (printed with the results).
LIMITS = ("max_concurrent_generations_per_tenant", "max_batch_size", "adapter_cache_size",
          "max_pinned_adapters_per_tenant", "adapter_slot_wait_seconds", "max_active_evaluations_per_tenant",
          "max_in_flight_per_tenant", "max_active_jobs_per_tenant", "max_jobs_created_per_minute_per_tenant",
          "webhook_max_endpoints_per_tenant",
          "webhook_in_flight_per_tenant", "webhook_delivery_threads", "webhook_attempt_deadline_seconds",
          "rate_limit_per_minute", "event_stream_poll_seconds", "torch_threads", "worker_concurrency")
PROMPTS = ["Write a long story about a lighthouse keeper and the sea.", "Explain how rain forms, step by step.",
           "Describe a busy market in the morning, in detail.", "Give advice to someone learning to cook."]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def limits_in_force() -> dict[str, Any]:
    """The defaults of the limits that matter here (the service runs with no ADAPTERY_ variable setting them)."""
    from app.settings import Settings

    return {name: Settings.model_fields[name].default for name in LIMITS}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def own_address() -> str:
    """A non-loopback address of this machine, for the slow webhook server: the service refuses loopback webhook
    targets unless ADAPTERY_WEBHOOK_ALLOWED_HOSTS names them, and this way no setting changes. '' if none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))  # UDP: nothing is sent; picks the outgoing interface
            address = str(probe.getsockname()[0])
        except OSError:
            return ""
    return "" if address.startswith("127.") or address == "0.0.0.0" else address


def cpu_seconds() -> tuple[float, dict[int, float]]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and of each live process below
    it): over a phase, the machine's less ours is what other processes (other people's work) took meanwhile."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4)) / tick  # all but idle and iowait
    ours: dict[int, float] = {}
    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ours[pid] = (int(stat[11]) + int(stat[12])) / tick  # utime, stime
    return busy, ours


class PhaseClock:
    """Wall time of a phase and the cores each of this run's processes, and other processes on the machine, kept
    busy during it, on average. `groups`: the name of each process of ours (pid -> name), asked at the end."""

    def __init__(self, groups: Callable[[], dict[int, str]]) -> None:
        self.groups = groups
        self.wall = time.monotonic()
        self.busy, self.ours = cpu_seconds()

    def done(self) -> dict[str, Any]:
        wall = time.monotonic() - self.wall
        busy, ours = cpu_seconds()
        names = self.groups()
        used: dict[str, float] = {}
        for pid, seconds in ours.items():
            name = names.get(pid, "other processes of this run")
            used[name] = used.get(name, 0.0) + (seconds - self.ours.get(pid, 0.0)) / wall
        total = sum(used.values())
        return {"wall_s": wall, "machine_busy_cores": (busy - self.busy) / wall, "our_processes_cores": total,
                "other_processes_cores": max(0.0, (busy - self.busy) / wall - total), "by_process": used}


class SilentServer:
    """Accepts TCP connections and never answers (nor reads): a webhook receiver that hangs every delivery."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        self.host, self.port = host, int(self.sock.getsockname()[1])
        self.accepted = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="silent-webhook-server").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def descendants(pid: int) -> list[int]:
    """Every process below `pid` now (from /proc), so that none outlives the run if its parent dies first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


SERVICES = {
    "all": "adaptery serve: role all (API and console in one process, the serving engine in a process of its own), "
           "SQLite, embedded broker, its supervised worker (concurrency 1)",
    "one-process": "adaptery serve: role all with ADAPTERY_INFERENCE_PROCESS=false (API + engine in one process), "
                   "SQLite, embedded broker, its supervised worker (concurrency 1)",
    "tiers": "tiers on this machine: adaptery serve --role api, adaptery serve --role inference and adaptery worker "
             "(concurrency 1), SQLite, embedded broker",
}


class Service:
    """`adaptery serve` (role all, with its supervised worker) on a scratch data dir, as `make run` starts it."""

    def __init__(self, workdir: Path, admin_key: str, *, one_process: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERY_")}
        self.env.update({
            "ADAPTERY_DATA_DIR": str(workdir / "data"), "ADAPTERY_PORT": str(self.port),
            "ADAPTERY_ADMIN_KEY": admin_key, "ADAPTERY_MODEL_CACHE_DIR": str(ROOT / ".cache" / "models"),
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "ADAPTERY_INFERENCE_PROCESS": "false" if one_process else "true"})
        self.process: subprocess.Popen[bytes] | None = None
        self.known: set[int] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log_file = open(self.workdir / "serve.log", "ab")  # noqa: SIM115 (open for the process's life)
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=self.env,
                                        stdout=log_file, stderr=subprocess.STDOUT)
        # Up, and its worker consuming (webhooks and evaluations need it).
        self.wait_ready({"serve": self.process}, lambda checks: bool(checks.get("worker", {}).get("ok")),
                        self.workdir / "serve.log")

    def wait_ready(self, processes: dict[str, subprocess.Popen[bytes]], ready: Callable[[dict[str, Any]], bool],
                   logs: Path) -> None:
        """Poll /ready until `ready(checks)` holds (300 s at most), failing at once if a process exits."""
        deadline = time.monotonic() + 300
        while True:
            for name, process in processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"the {name} process exited with {process.returncode}; see {logs}")
            try:
                if ready(httpx.get(f"{self.url}/ready", timeout=5).json().get("checks", {})):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service did not become ready; see {logs}")
            time.sleep(0.5)
        self.remember()

    def remember(self) -> None:
        if self.process is not None:
            self.known.update(descendants(self.process.pid))

    def stop(self) -> None:
        """SIGTERM to `adaptery serve` (it stops its worker), then any process it started that is still there."""
        if self.process is None:
            return
        self.remember()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        time.sleep(1)
        for pid in self.known:  # only processes this run started, by id
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.process = None


def make_adapters(workdir: Path, count: int) -> list[Path]:
    """`count` LoRA adapters for the default model, made with PEFT (rank 8 on every projection, random non-zero
    weights, as bench/serving.py makes them), saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.base_models import LLAMA_TARGET_MODULES
    from app.services import base_models
    from app.settings import Settings

    settings = Settings(model_cache_dir=ROOT / ".cache" / "models")
    base = AutoModelForCausalLM.from_pretrained(
        base_models.local_path(settings, base_models.resolve(settings, MODEL)))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LLAMA_TARGET_MODULES),
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(21)
    folders = []
    for i in range(count):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
                elif ".lora_B." in name:
                    param.normal_(0.0, 0.1, generator=generator)
        folder = workdir / "loras" / f"adapter-{i:02d}"
        model.save_pretrained(str(folder), safe_serialization=True)
        folders.append(folder)
    return folders


def import_adapter(client: httpx.Client, folder: Path, name: str) -> dict[str, Any]:
    parts = [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    answer = client.post("/v1/adapters", data={"name": name}, files=parts)
    if answer.status_code != 200:
        raise RuntimeError(f"importing {name}: {answer.status_code} {answer.text[:500]}")
    return dict(answer.json())


def small_file() -> bytes:
    return b"".join(DATASET.read_bytes().splitlines(keepends=True)[:SMALL_FILE_LINES])


# --- tenant B -------------------------------------------------------------------------------------------------


class TenantB:
    def __init__(self, url: str, key: str, model: str, max_tokens: int) -> None:
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        self.model, self.max_tokens = model, max_tokens
        self.data = small_file()
        self.failures: list[dict[str, Any]] = []
        # B is an ordinary tenant: it keeps under its own job-creation limit (ADAPTERY_MAX_JOBS_CREATED_PER_MINUTE_
        # PER_TENANT), waiting, untimed, when a fast run's rounds would go over it. Its 429 would be its own doing.
        self.created: list[float] = []
        self.creations_per_minute = int(limits_in_force()["max_jobs_created_per_minute_per_tenant"])

    def _timed(self, action: str, phase: str, send: Any) -> tuple[float, httpx.Response | None]:
        started = time.perf_counter()
        try:
            answer: httpx.Response | None = send()
        except httpx.HTTPError as exc:
            answer = None
            self.failures.append({"phase": phase, "action": action, "status": type(exc).__name__,
                                  "detail": str(exc)[:200]})
        took = time.perf_counter() - started
        if answer is not None and not answer.is_success:
            self.failures.append({"phase": phase, "action": action, "status": str(answer.status_code),
                                  "detail": answer.text[:300]})
        return took, answer

    def round(self, phase: str, n: int) -> dict[str, float | None]:
        """One of each action, timed (seconds; None for a failed one)."""
        out: dict[str, float | None] = {}
        took, answer = self._timed("models", phase, lambda: self.client.get("/v1/models"))
        out["models"] = took if answer is not None and answer.is_success else None
        took, answer = self._timed("upload", phase, lambda: self.client.post(
            "/v1/files", data={"purpose": "fine-tune"}, files={"file": (f"b-{phase}-{n}.jsonl", self.data)}))
        file_id = answer.json()["id"] if answer is not None and answer.is_success else None
        out["upload"] = took if file_id else None
        took, answer = self._timed("chat", phase, lambda: self.client.post("/v1/chat/completions", json={
            "model": self.model, "max_tokens": self.max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Say hello to number {n}."}]}))
        out["chat"] = took if answer is not None and answer.is_success else None
        out["create job"] = None
        if file_id:
            self._keep_under_the_creation_limit()
            took, answer = self._timed("create job", phase, lambda: self.client.post(
                "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id, "seed": n}))
            if answer is not None and answer.is_success:
                out["create job"] = took
                job_id = answer.json()["id"]
                self._timed("cancel job (untimed)", phase,
                            lambda: self.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"))
        return out

    def _keep_under_the_creation_limit(self) -> None:
        now = time.monotonic()
        self.created = [t for t in self.created if now - t < 60.5]
        if self.creations_per_minute > 0 and len(self.created) >= self.creations_per_minute:
            time.sleep(60.5 - (now - self.created[0]))
        self.created.append(time.monotonic())

    def close(self) -> None:
        self.client.close()


def run_b(tenant: TenantB, phase: str, rounds: int, deadline: float) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {a: [] for a in B_ACTIONS}
    for n in range(rounds):
        if time.monotonic() > deadline:
            log(f"{phase}: stopped after {n} rounds (time bound)")
            break
        for action, took in tenant.round(phase, n).items():
            if took is not None:
                times[action].append(took)
    return times


# --- tenant A (its own process) -------------------------------------------------------------------------------


def status_of(answer: httpx.Response) -> str:
    """The status, with the error's code for a refusal (which limit refused it: rate limit, concurrency, ...)."""
    if answer.is_success:
        return str(answer.status_code)
    try:
        code = answer.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return f"{answer.status_code} {code}" if code else str(answer.status_code)


def tenant_a_main(config: dict[str, Any], ready: Any, stop: Any, results: Any) -> None:
    """Entry of A's process: runs the load until `stop` is set, then puts its counts on `results`."""
    try:
        counts, notes = asyncio.run(_tenant_a(config, ready, stop))
        results.put({"counts": {f"{a}\t{s}": n for (a, s), n in counts.items()}, "notes": notes})
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which fails the run)
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


async def _tenant_a(config: dict[str, Any], ready: Any, stop: Any) -> tuple[Counter[tuple[str, str]], dict[str, Any]]:
    counts: Counter[tuple[str, str]] = Counter()
    notes: dict[str, Any] = {"streams_open_max": 0}
    open_streams = 0
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    client = httpx.AsyncClient(base_url=config["url"], headers={"Authorization": f"Bearer {config['key']}"},
                               limits=limits, timeout=httpx.Timeout(900, connect=60))
    stopping = asyncio.Event()

    in_flight: Counter[str] = Counter()

    def refusal_pause(answer: httpx.Response | None) -> float:
        """How long A waits before it tries a refused request again."""
        said = answer.headers.get("retry-after", "") if answer is not None else ""
        if config["honour_retry_after"] and said.replace(".", "", 1).isdigit():
            return max(REFUSAL_PAUSE_S, float(said))
        return REFUSAL_PAUSE_S

    async def send(action: str, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        in_flight[action] += 1
        try:
            answer = await client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            counts[(action, type(exc).__name__)] += 1
            return None
        finally:
            in_flight[action] -= 1
        counts[(action, status_of(answer))] += 1
        return answer

    async def pause_after(answer: httpx.Response | None) -> None:
        if answer is None or answer.status_code in (429, 503) or not answer.is_success:
            await asyncio.sleep(refusal_pause(answer))

    async def chat_loop(i: int) -> None:
        n = 0
        while not stopping.is_set():
            answer = await send("chat (long)", "POST", "/v1/chat/completions", json={
                "model": config["adapters"][(i + n) % len(config["adapters"])]["name"],
                "max_tokens": config["max_tokens"], "temperature": 0.8,
                "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}]})
            n += 1
            await pause_after(answer)

    async def stream_loop() -> None:
        nonlocal open_streams
        while not stopping.is_set():
            try:
                async with client.stream("GET", f"/v1/fine_tuning/jobs/{config['stream_job']}/events",
                                         params={"stream": "true"}, timeout=httpx.Timeout(None, connect=60)) as s:
                    if s.status_code != 200:
                        await s.aread()
                    counts[("event stream", status_of(s))] += 1
                    if s.status_code != 200:
                        await asyncio.sleep(refusal_pause(s))
                        continue
                    open_streams += 1
                    notes["streams_open_max"] = max(notes["streams_open_max"], open_streams)
                    try:
                        async for _ in s.aiter_lines():
                            pass
                    finally:
                        open_streams -= 1
                counts[("event stream", "ended by the server")] += 1
            except httpx.HTTPError as exc:
                counts[("event stream", type(exc).__name__)] += 1
                await asyncio.sleep(REFUSAL_PAUSE_S)

    async def evaluation_loop() -> None:
        while not stopping.is_set():
            answer = await send("evaluation", "POST", "/v1/evaluations", json={
                "file": config["file"], "models": [config["adapters"][0]["name"]]})
            await pause_after(answer)

    async def job_churn_loop() -> None:
        """Jobs created and cancelled, so that a `cancelled` delivery to every endpoint is due each time."""
        n = 0
        while not stopping.is_set():
            answer = await send("job create (webhooks)", "POST", "/v1/fine_tuning/jobs",
                                json={"model": MODEL, "training_file": config["file"], "seed": n})
            n += 1
            if answer is not None and answer.is_success:
                await send("job cancel (webhooks)", "POST", f"/v1/fine_tuning/jobs/{answer.json()['id']}/cancel")
                await asyncio.sleep(0.2)
            else:
                await pause_after(answer)

    # The set-up of the misbehaviour, counted with the rest: webhook endpoints past the limit, the streams' job.
    for i in range(config["webhooks"] if "webhooks" in config["load"] else 0):
        await send("webhook endpoint", "POST", "/v1/webhooks", json={"url": f"{config['hook_url']}/hook-{i}"})
    job = await send("job create (streams)", "POST", "/v1/fine_tuning/jobs",
                     json={"model": MODEL, "training_file": config["file"], "seed": 1})
    if job is None or not job.is_success:
        raise RuntimeError(f"A could not create the job its streams watch: {job and job.text[:300]}")
    config["stream_job"] = job.json()["id"]
    await send("job pause (streams)", "POST", f"/v1/fine_tuning/jobs/{config['stream_job']}/pause")

    load = config["load"]
    streams = config["streams"] if "streams" in load else 0
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(stream_loop()) for _ in range(streams)]
    if "pins" in load:
        tasks += [asyncio.create_task(send("pin", "POST", f"/v1/adapters/{a['id']}/pin"))
                  for a in config["adapters"]]
    if "chats" in load:
        tasks += [asyncio.create_task(chat_loop(i)) for i in range(config["chats"])]
    if "evaluations" in load:
        tasks += [asyncio.create_task(evaluation_loop()) for _ in range(config["eval_senders"])]
    if "webhooks" in load:
        tasks.append(asyncio.create_task(job_churn_loop()))
    if "training" in load:  # one job that trains for longer than the run; the worker takes it during A's ramp
        await send("job create (training)", "POST", "/v1/fine_tuning/jobs", json={
            "model": MODEL, "training_file": config["file"], "seed": 2, "hyperparameters": {"n_epochs": 50}})
    deadline = time.monotonic() + STREAM_OPEN_WAIT_S
    while open_streams < streams and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    notes["streams_open_at_start"] = open_streams
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.2)
    notes["streams_open_at_end"] = open_streams
    stopping.set()
    for action, n in in_flight.items():
        if n:
            counts[(action, "in flight at the end")] += n
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    return counts, notes


# --- the run ----------------------------------------------------------------------------------------------------


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """p50 and p95 of each action, with every sample in the order taken (a p95 of 30 is two samples' worth)."""
    return {a: {"n": len(v), "p50_ms": median(v) * 1000, "p95_ms": percentile(v, 95) * 1000,
                "samples_ms": [round(t * 1000, 1) for t in v]} for a, v in times.items()}


def admin_tenant(url: str, admin_key: str, name: str) -> str:
    answer = httpx.post(f"{url}/v1/admin/tenants", json={"name": name},
                        headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    if answer.status_code != 200:
        raise RuntimeError(f"creating tenant {name}: {answer.status_code} {answer.text[:300]}")
    return str(answer.json()["api_key"])


class TieredService(Service):
    """The same service in tiers on this machine (docs/deployment.md): `adaptery serve --role api` (no engine),
    `adaptery serve --role inference` (the engine) and `adaptery worker`, on one SQLite file and the embedded
    broker. The API's threads then share no interpreter lock with the decode loop."""

    def __init__(self, workdir: Path, admin_key: str) -> None:
        super().__init__(workdir, admin_key)
        self.replica_port = free_port()
        self.env["ADAPTERY_INTERNAL_KEY"] = "bench-tiers-" + secrets.token_urlsafe(24)
        self.others: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log_file = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (open for the process's life)
        return subprocess.Popen([sys.executable, "-m", "app.cli", *command], cwd=ROOT, env={**self.env, **env},
                                stdout=log_file, stderr=subprocess.STDOUT)

    def start(self) -> None:
        done = subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env=self.env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"adaptery migrate failed:\n{done.stdout}{done.stderr}")
        self.others["inference"] = self._spawn("inference", ["serve", "--role", "inference", "--no-migrate"], {
            "ADAPTERY_PORT": str(self.replica_port), "ADAPTERY_PRELOAD_INFERENCE": "true"})
        self.others["worker"] = self._spawn("worker", ["worker"], {})
        self.process = self._spawn("serve", ["serve", "--role", "api", "--no-migrate"], {
            "ADAPTERY_INFERENCE_URLS": f"http://127.0.0.1:{self.replica_port}"})
        assert self.process is not None
        # Up, its worker consuming and its replica seen.
        self.wait_ready({"api": self.process, **self.others},
                        lambda checks: bool(checks.get("worker", {}).get("ok"))
                        and checks.get("inference", {}).get("up") == 1, self.workdir)

    def remember(self) -> None:
        super().remember()
        for process in self.others.values():
            self.known.update([process.pid, *descendants(process.pid)])

    def stop(self) -> None:
        for process in self.others.values():
            if process.poll() is None:
                process.terminate()
        super().stop()
        self.others.clear()


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    admin_key = "bench-admin-" + secrets.token_urlsafe(24)
    address = own_address()
    service = (TieredService(workdir, admin_key) if args.topology == "tiers"
               else Service(workdir, admin_key, one_process=args.topology == "one-process"))
    if not address:  # no other interface: the loopback server must be allowed explicitly
        service.env["ADAPTERY_WEBHOOK_ALLOWED_HOSTS"] = '["127.0.0.1"]'
    hooks = SilentServer(address or "127.0.0.1")
    a_process: multiprocessing.process.BaseProcess | None = None
    tenant_b: TenantB | None = None
    try:
        log(f"making {args.a_adapters + 1} LoRA adapters with PEFT ...")
        folders = make_adapters(workdir, args.a_adapters + 1)
        log(f"starting the service ({args.topology}) ...")
        service.start()
        log(f"service ready after {time.monotonic() - started:.0f} s")
        key_a = admin_tenant(service.url, admin_key, "tenant-a (noisy)")
        key_b = admin_tenant(service.url, admin_key, "tenant-b (ordinary)")
        tag = workdir.name[-6:].lower()
        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key_a}"}, timeout=300) as ca:
            adapters_a = [import_adapter(ca, f, f"noisy-{tag}-a{i}") for i, f in enumerate(folders[1:])]
            file_a = ca.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("a.jsonl", small_file())}).raise_for_status().json()["id"]
        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key_b}"}, timeout=300) as cb:
            adapter_b = import_adapter(cb, folders[0], f"noisy-{tag}-b")
        service.remember()

        tenant_b = TenantB(service.url, key_b, adapter_b["name"], args.b_max_tokens)
        for n in range(args.warm_up):  # first load of B's adapter, first requests of each route
            tenant_b.round("warm-up", n)
        warm_failures = [f for f in tenant_b.failures if f["phase"] == "warm-up"]
        if warm_failures:
            raise RuntimeError(f"B's warm-up failed, nothing to compare: {warm_failures}")
        log("phase 1: quiet ...")
        def groups() -> dict[int, str]:
            out = {os.getpid(): "B's client (this process)"}
            if isinstance(service, TieredService):
                if service.process is not None:
                    out[service.process.pid] = "API process (role api)"
                for name, process in service.others.items():
                    label = "inference process (the engine)" if name == "inference" else "its worker"
                    out.update({pid: label for pid in [process.pid, *descendants(process.pid)]})
            elif service.process is not None:
                apart = args.topology == "all"
                out[service.process.pid] = "adaptery serve (API)" if apart else "adaptery serve (API + engine)"
                out.update({pid: "its serving engine" if "--role inference" in command_line(pid) else "its worker"
                            for pid in descendants(service.process.pid)})
            if a_process is not None and a_process.pid is not None:
                out[a_process.pid] = "A's client"
            return out

        clock = PhaseClock(groups)
        quiet = run_b(tenant_b, "quiet", args.rounds, time.monotonic() + args.phase_limit)
        phases = {"quiet": clock.done()}

        log("phase 2: starting tenant A ...")
        context = multiprocessing.get_context("spawn")
        ready, stop, results = context.Event(), context.Event(), context.Queue()
        config = {"url": service.url, "key": key_a, "adapters": [{"id": a["id"], "name": a["name"]}
                                                                 for a in adapters_a],
                  "file": file_a, "hook_url": f"http://{hooks.host}:{hooks.port}", "webhooks": args.a_webhooks,
                  "chats": args.a_chats, "max_tokens": args.a_max_tokens, "streams": args.a_streams,
                  "eval_senders": args.a_eval_senders, "load": args.a_load,
                  "honour_retry_after": not args.a_ignores_retry_after}
        a_process = context.Process(target=tenant_a_main, args=(config, ready, stop, results), name="tenant-a")
        a_process.start()
        if not ready.wait(STREAM_OPEN_WAIT_S + 120):
            raise TimeoutError("tenant A's load did not start")
        time.sleep(args.a_ramp)  # A's chats fill the batch, its first evaluations and deliveries are under way
        service.remember()
        log("phase 2: under load ...")
        clock = PhaseClock(groups)
        loaded = run_b(tenant_b, "under load", args.rounds, time.monotonic() + args.phase_limit)
        phases["under load"] = clock.done()
        stop.set()
        a_result = results.get(timeout=120)
        a_process.join(timeout=60)
        if "error" in a_result:
            raise RuntimeError(f"tenant A failed: {a_result['error']}")
        deliveries = webhook_deliveries(service.url, key_a)
    finally:
        if a_process is not None and a_process.is_alive():
            a_process.kill()
        if tenant_b is not None:
            tenant_b.close()
        service.stop()
        hooks.close()

    a_counts: dict[str, dict[str, int]] = {}
    for joined, n in sorted(a_result["counts"].items()):
        action, status = joined.split("\t")
        a_counts.setdefault(action, {})[status] = n
    q, u = summarise(quiet), summarise(loaded)
    b: dict[str, Any] = {}
    for action in B_ACTIONS:
        p95_ratio = ratio(u[action]["p95_ms"], q[action]["p95_ms"])
        failures = sum(1 for f in tenant_b.failures if f["action"] == action)
        b[action] = {"quiet": q[action], "under_load": u[action], "p95_ratio": p95_ratio,
                     "target_ratio": TARGETS[action], "failures": failures,
                     "met": bool(p95_ratio <= TARGETS[action]) and failures == 0}
    b_failures = [f for f in tenant_b.failures if f["phase"] != "warm-up"]
    return {"setup": vars(args), "hardware": hardware(), "model": MODEL,
            "service": SERVICES[args.topology],
            "limits": limits_in_force(), "webhook_server": f"{hooks.host} (accepts, never answers)",
            "b": b, "b_failures": b_failures, "a_counts": a_counts, "a_notes": a_result["notes"],
            "slow_webhook_connections": hooks.accepted, "webhook_deliveries": deliveries,
            "phases": phases, "service_log": log_problems(*workdir.glob("*.log")),
            "serving_dtype": served_in(*workdir.glob("*.log")), "wall_s": time.monotonic() - started,
            "all_targets_met": all(v["met"] for v in b.values()) and not b_failures}


def log_problems(*paths: Path) -> dict[str, Any]:
    """Tracebacks and ERROR lines in the service's logs (a 500 or a crash shows here), with the first few."""
    lines: list[str] = []
    for path in paths:
        with contextlib.suppress(OSError):
            lines += path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if " ERROR " in line or "ERROR/" in line]  # uvicorn's and Celery's formats
    flagged = [line for line in lines if "Traceback" in line or line in errors]
    return {"tracebacks": sum("Traceback" in line for line in lines), "error_lines": len(errors),
            "first": [f[:300] for f in flagged[:5]]}


def served_in(*paths: Path) -> str:
    """The dtype the engine held the base model in, from its log line ("auto" decides it by the CPU)."""
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if "serving base model" in line and " in " in line:
                    return line.split("serving base model", 1)[1].split(" in ", 1)[1].split()[0]
    return "unknown"


def webhook_deliveries(url: str, key: str) -> dict[str, int]:
    """A's webhook deliveries by status, over its endpoints (to show the slow endpoints were being tried)."""
    out: Counter[str] = Counter()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        answer = client.get("/v1/webhooks")
        if not answer.is_success:
            return {f"list endpoints: {answer.status_code}": 1}
        for endpoint in answer.json()["data"]:
            listed = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries")
            if not listed.is_success:
                out[f"list deliveries: {listed.status_code}"] += 1
                continue
            for delivery in listed.json()["data"]:
                attempted = "attempted" if delivery["attempts"] else "not yet attempted"
                out[f"{delivery['status']}, {attempted}"] += 1
    return dict(out)


def render(report: dict[str, Any]) -> str:
    hw, args = report["hardware"], report["setup"]
    retry = (f"after {REFUSAL_PAUSE_S} s whatever its Retry-After said" if args.get("a_ignores_retry_after")
             else f"after its Retry-After (at least {REFUSAL_PAUSE_S} s), as the OpenAI SDK does")
    rows = []
    for action, r in report["b"].items():
        q, u = r["quiet"], r["under_load"]
        rows.append([action, f"{q['n']}/{u['n']}", q["p50_ms"], q["p95_ms"], u["p50_ms"], u["p95_ms"],
                     f"{r['p95_ratio']:.2f}x", f"<= {r['target_ratio']:.0f}x", r["failures"],
                     "met" if r["met"] else "MISSED"])
    b_table = md_table(["B action", "n quiet/load", "p50 quiet ms", "p95 quiet ms", "p50 load ms", "p95 load ms",
                        "p95 ratio", "target", "B failures", "target"], rows)
    statuses = sorted({s for v in report["a_counts"].values() for s in v})
    a_table = md_table(["A action", *statuses, "total"],
                       [[a, *[str(v.get(s, "")) for s in statuses], str(sum(v.values()))]
                        for a, v in report["a_counts"].items()])
    limits = ", ".join(f"{k}={v}" for k, v in report["limits"].items())
    groups = list(dict.fromkeys(g for p in report["phases"].values() for g in p["by_process"]))
    cpu = md_table(["phase", "wall s", "machine busy (cores)", *groups, "other processes"],
                   [[name, p["wall_s"], f"{p['machine_busy_cores']:.2f}",
                     *[f"{p['by_process'].get(g, 0.0):.2f}" for g in groups], f"{p['other_processes_cores']:.2f}"]
                    for name, p in report["phases"].items()])
    problems = report["service_log"]
    failures = "\n".join(f"- {f['phase']} / {f['action']}: {f['status']} {f['detail']}"
                         for f in report["b_failures"]) or "none"
    notes = report["a_notes"]
    verdict = "all targets met" if report["all_targets_met"] else "TARGETS MISSED: " + ", ".join(
        a for a, r in report["b"].items() if not r["met"]) + (" (and B had failures)" if report["b_failures"] else "")
    return (f"## Noisy neighbour ({hw['cpu_model']}, {hw['nproc']} cores, load {hw['loadavg_1m_at_start']} at "
            f"start; torch {hw['torch']})\n\n"
            f"{report['service']}; model {report['model']} served in {report.get('serving_dtype', 'float32')}; "
            "every limit at its default.\n\n"
            f"Tenant B: {args['rounds']} rounds of models / upload ({SMALL_FILE_LINES}-line JSONL) / chat on its "
            f"adapter ({args['b_max_tokens']} tokens, not streamed) / create job, one request at a time. "
            f"Tenant A under load ({report['phases']['under load']['wall_s']:.0f} s): {args['a_chats']} long chats "
            f"({args['a_max_tokens']} tokens, restarted as each ends), {args['a_streams']} event streams on a "
            f"paused job (open at B's start: {notes.get('streams_open_at_start')}, at the end: "
            f"{notes.get('streams_open_at_end')}), pins of {args['a_adapters']} adapters, evaluations from "
            f"{args['a_eval_senders']} senders, {args['a_webhooks']} webhook endpoint requests to a server that "
            f"never answers (it accepted {report['slow_webhook_connections']} connections) and jobs created and "
            f"cancelled in a loop; a refused request is retried {retry}. A's misbehaviours this "
            f"run: {', '.join(args['a_load'])}.\n\n"
            f"{b_table}\n\n**{verdict}.** Targets (issue 21): p95 under load at most 2x quiet for models, upload "
            f"and create job, 3x for chat; no failure of B's.\n\nB's failures: {failures}\n\n"
            f"### Tenant A's requests by status\n\n{a_table}\n\n"
            f"A's webhook deliveries at the end (the newest 100 of each endpoint): "
            f"{report['webhook_deliveries'] or 'none'}\n\n"
            f"Limits in force (defaults): {limits}\n\n"
            f"### CPU during each phase ({hw['nproc']} cores)\n\n{cpu}\n\n"
            f"Other processes' share is other people's work on the machine: it slows both phases, not A.\n\n"
            f"The service's log: {problems['tracebacks']} tracebacks, {problems['error_lines']} ERROR lines"
            + (": " + " / ".join(problems["first"]) if problems["first"] else "") + "\n\n"
            f"The benchmark's clients share the machine's cores with the service; the run took "
            f"{report['wall_s']:.0f} s.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of B's four actions per phase")
    parser.add_argument("--warm-up", type=int, default=3, help="untimed rounds of B's before the quiet phase")
    parser.add_argument("--phase-limit", type=float, default=150.0,
                        help="seconds a phase of B's rounds may take; B stops early past it (bounded run)")
    parser.add_argument("--b-max-tokens", type=int, default=8)
    parser.add_argument("--a-chats", type=int, default=40)
    parser.add_argument("--a-max-tokens", type=int, default=512)
    parser.add_argument("--a-streams", type=int, default=100)
    parser.add_argument("--a-adapters", type=int, default=6, help="A's adapters, each pinned and chatted with")
    parser.add_argument("--a-eval-senders", type=int, default=4)
    parser.add_argument("--a-webhooks", type=int, default=25, help="webhook endpoints A asks for")
    parser.add_argument("--a-ramp", type=float, default=5.0, help="seconds of A's load before B's rounds start")
    parser.add_argument("--a-load", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                        default=list(DEFAULT_ACTIVITIES),
                        help=f"A's misbehaviours, comma-separated (default {','.join(DEFAULT_ACTIVITIES)}; also "
                             f"training: one long job); one alone shows what it costs B")
    parser.add_argument("--topology", choices=tuple(SERVICES), default="all",
                        help="all: `adaptery serve` as `make run` starts it (the engine in a process of its own); "
                             "one-process: the same with ADAPTERY_INFERENCE_PROCESS=false (API and engine in one "
                             "process); tiers: an API process, an inference process and a worker started by hand")
    parser.add_argument("--a-ignores-retry-after", action="store_true",
                        help=f"A retries every refusal after {REFUSAL_PAUSE_S} s, whatever its Retry-After said")
    parser.add_argument("--keep-logs", action="store_true", help="keep the scratch folder with the service's logs")
    parser.add_argument("--save", action="store_true", help="write bench/results/noisy_neighbour.{json,md}")
    args = parser.parse_args()
    unknown = set(args.a_load) - set(ACTIVITIES)
    if unknown:
        parser.error(f"--a-load: unknown {sorted(unknown)}; accepted: {', '.join(ACTIVITIES)}")

    workdir = Path(tempfile.mkdtemp(prefix="adaptery-bench-noisy-"))
    try:  # the folder (the service's log) is kept after a run that failed
        report = run(args, workdir)
    except BaseException:
        print(f"failed; the service's log is in {workdir / 'serve.log'}", file=sys.stderr)
        raise
    if args.keep_logs:
        print(f"the service's logs are in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    text = render(report)
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        name = "noisy_neighbour" if args.topology == "all" else f"noisy_neighbour_{args.topology.replace('-', '_')}"
        (RESULTS / f"{name}.json").write_text(json.dumps(rounded(report), indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(text)
    print(json.dumps(rounded(report)))


if __name__ == "__main__":
    main()
