"""What one process of each tier does on this machine, measured through the real processes, and the number of
each that a team needs, worked out from those figures.

One phase at a time, so that no two phases share the CPU:

1. training: an API (role api) and one training worker (`adaptery worker`); a LoRA job on the default base model
   (SmolLM2-135M-Instruct) over examples/length_spread.jsonl, after a warm-up job on the worker. Measured: the
   worker's training speed (tokens/s, the median over the job's metrics events) and the job's fixed cost (its
   wall time from creation to success less its tokens at that speed: queueing, loading the model, tokenising,
   saving; no validation file, so no validation or end report, which a job with one pays for too).
2. inference: one inference replica (role inference, the default model) behind the API, `--adapters` LoRA
   adapters imported; `--clients` clients stream chat completions, each request for one of the adapters in turn,
   `--max-tokens` tokens each. Measured: output tokens/s of the replica, time to the first token, latency.
3. control plane: the same API answering reads (a job, its events, the job and file lists, the models) to
   `--clients` clients: requests/s and p95; and what the API's forwarding adds to a chat request, the same
   1-token request sent `--forward-requests` times through the API and straight to the replica.

The benchmark's own client shares the machine's cores with the process it measures, so on a small machine the
API's figure is a lower bound. Then sizing: for each team size, the processes of each tier its load needs at
the measured rates, from the per-person load given by the options (an assumption, printed with the table;
change it to yours).

    python -m bench.capacity [--database-url URL] [--threads 2] [--save]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, ROOT, hardware, md_table, median, percentile, rounded
from bench.routing import free_port

KEY = "sk-ady-bench-capacity-key"
INTERNAL_KEY = "bench-capacity-internal-key"
DATASET = ROOT / "examples" / "length_spread.jsonl"
WARM_UP_DATASET = ROOT / "examples" / "sentiment_train.jsonl"
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms, step by step.",
           "Describe a busy market in the morning.", "Give advice to someone learning to cook."]
TEAM_SIZES = [5, 20, 100]


class Tiers:
    """The processes of the run, started and stopped per phase; all on one database and one broker."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERY_")}
        self.env.update({
            "ADAPTERY_DATA_DIR": str(workdir / "data"),
            "ADAPTERY_DATABASE_URL": args.database_url or f"sqlite:///{workdir / 'adaptery.db'}",
            "ADAPTERY_BOOTSTRAP_KEY": KEY, "ADAPTERY_INTERNAL_KEY": INTERNAL_KEY,
            "ADAPTERY_RATE_LIMIT_PER_MINUTE": "0", "ADAPTERY_TORCH_THREADS": str(args.threads),
            "ADAPTERY_MODEL_CACHE_DIR": str(ROOT / ".cache" / "models"), "PYTHONUNBUFFERED": "1",
        })
        if args.broker_url:
            self.env["ADAPTERY_BROKER_URL"] = args.broker_url
        self.api_port, self.replica_port = free_port(), free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        for command in ("migrate", "prepare-model"):
            done = subprocess.run([sys.executable, "-m", "app.cli", command], cwd=ROOT, env=self.env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"adaptery {command} failed:\n{done.stdout}{done.stderr}")

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        metrics = self.workdir / f"metrics-{name}"
        metrics.mkdir(exist_ok=True)
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (open for the process's life)
        self.processes[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                env={**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics), **env})

    def _uvicorn(self, port: int) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"]

    def start_api(self) -> None:
        self._spawn("api", self._uvicorn(self.api_port), {
            "ADAPTERY_ROLE": "api", "ADAPTERY_INFERENCE_URLS": self.replica_url})
        self._wait(f"{self.url}/health")

    def start_worker(self) -> None:
        """A training worker, returned once it consumes (its heartbeat is fresh), so start-up is not timed."""
        self._spawn("worker", [sys.executable, "-m", "app.cli", "worker"], {})
        deadline = time.monotonic() + 300
        while not httpx.get(f"{self.url}/ready", timeout=5).json()["checks"]["worker"]["ok"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not start; see the logs in {self.workdir}")
            time.sleep(0.3)

    def start_replica(self) -> None:
        self._spawn("replica", self._uvicorn(self.replica_port), {
            "ADAPTERY_ROLE": "inference", "ADAPTERY_PORT": str(self.replica_port),
            "ADAPTERY_PRELOAD_INFERENCE": "true"})
        self._wait(f"{self.replica_url}/ready")
        deadline = time.monotonic() + 60  # the API sees the replica at its next poll
        while httpx.get(f"{self.url}/ready", timeout=5).json()["checks"]["inference"]["up"] != 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the API does not see the inference replica")
            time.sleep(0.3)

    def _wait(self, url: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{url} did not answer; see the logs in {self.workdir}")

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def replica_url(self) -> str:
        return f"http://127.0.0.1:{self.replica_port}"

    def client(self, base_url: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=base_url or self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)


def train(client: httpx.Client, dataset: Path) -> tuple[dict[str, Any], float]:
    """One LoRA job on the default model over `dataset`: the finished job and its wall time from creation."""
    file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": (dataset.name, dataset.read_bytes())}).raise_for_status().json()["id"]
    started = time.monotonic()
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": "SmolLM2-135M-Instruct", "training_file": file_id, "seed": 1,
        "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1}}}}).raise_for_status().json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").raise_for_status().json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"the training job ended {job['status']}: {job.get('error')}")
    return job, time.monotonic() - started


def training_phase(tiers: Tiers) -> dict[str, Any]:
    tiers.start_api()
    tiers.start_worker()
    with tiers.client() as client:
        train(client, WARM_UP_DATASET)  # the worker's first job pays for first allocations and a cold cache
        job, wall = train(client, DATASET)
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                            params={"limit": 1000}).raise_for_status().json()["data"]
    tiers.stop("worker")
    speeds = [e["data"]["tokens_per_second"] for e in events
              if e.get("type") == "metrics" and (e.get("data") or {}).get("tokens_per_second")]
    if not speeds:
        raise RuntimeError(f"the job {job['id']} logged no training speed")
    speed = median(speeds)
    tokens = job["trained_tokens"]
    return {"job": job["id"], "fine_tuned_model": job["fine_tuned_model"], "trained_tokens": tokens,
            "wall_s": wall, "tokens_per_s": speed, "fixed_cost_s": max(0.0, wall - tokens / speed),
            "hyperparameters": job["hyperparameters"]}


def import_adapters(tiers: Tiers, count: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    from app.services import base_models
    from app.settings import Settings
    from bench.serving import create_adapters

    settings = Settings(model_cache_dir=ROOT / ".cache" / "models")
    base = AutoModelForCausalLM.from_pretrained(
        base_models.local_path(settings, base_models.resolve(settings, "SmolLM2-135M-Instruct")))
    folders, _ = create_adapters(base, tiers.workdir / "loras", count, seed=3)
    names = []
    with tiers.client() as client:
        for i, folder in enumerate(folders):
            parts = [("files", (n, (folder / n).read_bytes()))
                     for n in ("adapter_config.json", "adapter_model.safetensors")]
            name = f"capacity-{tiers.workdir.name[-6:].lower()}-{i:02d}"  # unique per run: names are global
            names.append(client.post("/v1/adapters", data={"name": name}, files=parts)
                         .raise_for_status().json()["name"])
    return names


def stream_chat(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, tokens) of one streamed chat completion; an error or no answer raises."""
    started = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", "/v1/chat/completions", json={
            "model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - started
    if first is None or not tokens:
        raise RuntimeError(f"{model}: the stream ended without content or usage")
    return first, time.perf_counter() - started, tokens


def inference_phase(tiers: Tiers, models: list[str], args: argparse.Namespace) -> dict[str, Any]:
    requests = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    with tiers.client() as client:
        for model in models:  # every adapter loaded once, so the phase measures serving, not first loads
            stream_chat(client, model, PROMPTS[0], 1)
        with ThreadPoolExecutor(args.clients) as pool:
            started = time.perf_counter()
            results = list(pool.map(lambda r: stream_chat(client, r[0], r[1], args.max_tokens), requests))
            wall = time.perf_counter() - started
    ttft = [r[0] for r in results]
    latency = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"requests": len(requests), "clients": args.clients, "adapters": len(models),
            "max_tokens": args.max_tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "requests_per_s": len(requests) / wall, "ttft_p50_ms": median(ttft) * 1000,
            "ttft_p95_ms": percentile(ttft, 95) * 1000, "latency_p50_s": median(latency),
            "latency_p95_s": percentile(latency, 95)}


def control_phase(tiers: Tiers, job_id: str, args: argparse.Namespace) -> dict[str, Any]:
    paths = [f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events?limit=20",
             "/v1/fine_tuning/jobs?limit=20", "/v1/files", "/v1/models"]
    calls = [paths[i % len(paths)] for i in range(args.control_requests)]
    with tiers.client() as client:
        for path in paths:
            client.get(path).raise_for_status()

        def one(path: str) -> float:
            started = time.perf_counter()
            client.get(path).raise_for_status()
            return time.perf_counter() - started

        with ThreadPoolExecutor(args.clients) as pool:
            started = time.perf_counter()
            latencies = list(pool.map(one, calls))
            wall = time.perf_counter() - started
    forwarded, direct = [], []
    with tiers.client() as via_api, tiers.client(tiers.replica_url) as to_replica:
        for _ in range(args.forward_requests):  # interleaved, so both see the same machine
            forwarded.append(stream_chat(via_api, "SmolLM2-135M-Instruct", "Say hi", 1)[1])
            direct.append(stream_chat(to_replica, "SmolLM2-135M-Instruct", "Say hi", 1)[1])
    return {"requests": len(calls), "requests_per_s": len(calls) / wall, "p50_ms": median(latencies) * 1000,
            "p95_ms": percentile(latencies, 95) * 1000,
            "forwarded_p50_ms": median(forwarded) * 1000, "direct_p50_ms": median(direct) * 1000,
            "forwarding_adds_ms": (median(forwarded) - median(direct)) * 1000}


def sizing(training: dict[str, Any], inference: dict[str, Any], control: dict[str, Any],
           args: argparse.Namespace) -> list[dict[str, Any]]:
    """Processes of each tier per team size, from the measured rates and the per-person load in `args`."""
    rows = []
    for people in TEAM_SIZES:
        jobs_per_day = people * args.jobs_per_person_per_day
        worker_seconds = jobs_per_day * (training["fixed_cost_s"] + args.tokens_per_job / training["tokens_per_s"])
        workers = math.ceil(worker_seconds / (args.working_hours * 3600))
        # Chat: people * requests an hour at the busiest hour, each `output_tokens` long.
        peak_tokens_per_s = people * args.chats_per_person_per_hour * args.output_tokens / 3600
        replicas = math.ceil(peak_tokens_per_s / inference["output_tokens_per_s"])
        # Control plane: each person's console or client polling a job, plus every chat passing through the API.
        peak_requests_per_s = people * (args.polls_per_person_per_s + args.chats_per_person_per_hour / 3600)
        apis = math.ceil(peak_requests_per_s / control["requests_per_s"])
        rows.append({"people": people, "jobs_per_day": jobs_per_day, "worker_hours_per_day": worker_seconds / 3600,
                     "workers": max(1, workers), "peak_output_tokens_per_s": peak_tokens_per_s,
                     "inference_replicas": max(1, replicas), "peak_api_requests_per_s": peak_requests_per_s,
                     "api_processes": max(1, apis)})
    return rows


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    t, i, c = report["training"], report["inference"], report["control"]
    measured = md_table(["tier (one process)", "measured", "figure"], [
        ["training worker", "LoRA training speed (median of the job's steps)", f"{t['tokens_per_s']:.0f} tokens/s"],
        ["training worker", f"fixed cost per job (wall {t['wall_s']:.0f} s for {t['trained_tokens']} tokens)",
         f"{t['fixed_cost_s']:.0f} s"],
        ["inference replica", f"output tokens/s, {i['clients']} clients over {i['adapters']} adapters, "
                              f"{i['max_tokens']} tokens each", f"{i['output_tokens_per_s']:.0f} tokens/s"],
        ["inference replica", "time to first token p50 / p95", f"{i['ttft_p50_ms']:.0f} / {i['ttft_p95_ms']:.0f} ms"],
        ["inference replica", "request latency p50 / p95", f"{i['latency_p50_s']:.1f} / {i['latency_p95_s']:.1f} s"],
        ["API", f"control-plane reads, {args.clients} clients (p95 {c['p95_ms']:.0f} ms)",
         f"{c['requests_per_s']:.0f} requests/s"],
        ["API", f"forwarding a 1-token chat ({c['forwarded_p50_ms']:.0f} against {c['direct_p50_ms']:.0f} ms "
                "straight to the replica, p50)", f"+{c['forwarding_adds_ms']:.1f} ms"],
    ])
    needs = md_table(["people", "jobs a day", "worker-hours a day", "training workers", "peak chat tokens/s",
                      "inference replicas", "peak API requests/s", "API processes"],
                     [[r["people"], r["jobs_per_day"], f"{r['worker_hours_per_day']:.1f}", r["workers"],
                       f"{r['peak_output_tokens_per_s']:.0f}", r["inference_replicas"],
                       f"{r['peak_api_requests_per_s']:.1f}", r["api_processes"]] for r in report["sizing"]])
    load = (f"Per person: {args.jobs_per_person_per_day} fine-tune jobs a day of {args.tokens_per_job:,} training "
            f"tokens each, run within {args.working_hours} hours; at the busiest hour "
            f"{args.chats_per_person_per_hour} chat requests of {args.output_tokens} output tokens, and "
            f"{args.polls_per_person_per_s} API reads a second (a console or client watching a job).")
    return (f"## Capacity per process ({report['hardware']['cpu_model']}, {report['hardware']['nproc']} cores, "
            f"torch threads {args.threads}, database {report['database']}, broker {report['broker']})\n\n"
            f"{measured}\n\nThe benchmark's client runs on the same cores as the process it measures.\n\n"
            f"## Processes a team needs at these rates\n\n{load}\n\n{needs}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default="", help="default: a SQLite file in a scratch folder")
    parser.add_argument("--broker-url", default="", help="default: the embedded broker")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker and the replica")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--control-requests", type=int, default=1000)
    parser.add_argument("--forward-requests", type=int, default=30)
    parser.add_argument("--jobs-per-person-per-day", type=float, default=1.0)
    parser.add_argument("--tokens-per-job", type=int, default=1_000_000)
    parser.add_argument("--working-hours", type=float, default=10.0)
    parser.add_argument("--chats-per-person-per-hour", type=float, default=30.0)
    parser.add_argument("--output-tokens", type=int, default=200)
    parser.add_argument("--polls-per-person-per-s", type=float, default=0.5)
    parser.add_argument("--save", action="store_true", help="write bench/results/capacity.{json,md}")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="adaptery-bench-capacity-"))
    tiers = Tiers(workdir, args)
    try:  # the folder (the processes' logs) is removed only after a run that worked
        training = training_phase(tiers)
        print(f"training: {training['tokens_per_s']:.0f} tokens/s, fixed cost {training['fixed_cost_s']:.0f} s",
              flush=True)
        tiers.start_replica()
        models = [training["fine_tuned_model"], *import_adapters(tiers, args.adapters - 1)]
        inference = inference_phase(tiers, models, args)
        print(f"inference: {inference['output_tokens_per_s']:.0f} tokens/s", flush=True)
        control = control_phase(tiers, training["job"], args)
    except BaseException:
        tiers.stop_all()
        print(f"failed; the processes' logs are in {workdir}", file=sys.stderr)
        raise
    tiers.stop_all()
    shutil.rmtree(workdir, ignore_errors=True)
    database = tiers.env["ADAPTERY_DATABASE_URL"].split(":", 1)[0].split("+", 1)[0]
    broker = (args.broker_url or "embedded").split(":", 1)[0]
    report: dict[str, Any] = {"setup": vars(args), "hardware": hardware(), "database": database, "broker": broker,
                              "training": training, "inference": inference, "control": control}
    report["sizing"] = sizing(training, inference, control, args)
    text = render(report, args)
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "capacity.json").write_text(json.dumps(rounded(report), indent=2) + "\n")
        (RESULTS / "capacity.md").write_text(text)
    print(json.dumps(rounded(report)))


if __name__ == "__main__":
    main()
