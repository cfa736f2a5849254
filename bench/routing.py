"""Adapter-affinity routing against round robin, side by side in one run, on real processes.

One API process (ADAPTERY_ROLE=api) in front of three inference replicas (ADAPTERY_ROLE=inference), each
with room for `--slots` adapters in memory, serve `--adapters` LoRA adapters (random, made with PEFT on the
tiny test model) to `--clients` concurrent clients. The adapters are asked for with a Zipf-like skew
(adapter k with weight 1/(k+1)), as real traffic is: a few hot adapters and a long tail. The same request
sequence runs once per policy, each on freshly started replicas (cold memory). Reported per policy: cold
loads (adapters read from disk into a replica's memory, summed over the replicas' /metrics), requests and
generated tokens per second, and latency percentiles; and the ratios affinity / round robin.

    python -m bench.routing [--requests 300] [--adapters 30] [--replicas 3] [--slots 8] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, ROOT, hardware, md_table, median, percentile, ratio, rounded

KEY = "sk-ady-bench-routing-key"
INTERNAL_KEY = "bench-internal-key"
PROMPTS = ["Say hi", "Name a colour", "Count to three", "What is rain?", "Describe a cat", "Give a number"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Tiers:
    """The processes of one run: replicas first, then the API that routes to them."""

    def __init__(self, workdir: Path, tiny_model_dir: Path, args: argparse.Namespace):
        self.workdir = workdir
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERY_")}
        self.env.update({
            "ADAPTERY_DATA_DIR": str(workdir / "data"),
            "ADAPTERY_DATABASE_URL": f"sqlite:///{workdir / 'adaptery.db'}",
            "ADAPTERY_BASE_MODELS": json.dumps({"tiny-llama": str(tiny_model_dir)}),
            "ADAPTERY_DEFAULT_BASE_MODEL": "tiny-llama",
            "ADAPTERY_BOOTSTRAP_KEY": KEY, "ADAPTERY_INTERNAL_KEY": INTERNAL_KEY,
            "ADAPTERY_RATE_LIMIT_PER_MINUTE": "0", "ADAPTERY_TORCH_THREADS": "1",
            # Memory per replica: `slots` adapters in slots and no more in CPU memory, so an adapter that
            # leaves a replica's memory is read from disk again when it comes back.
            "ADAPTERY_ADAPTER_CACHE_SIZE": str(args.slots), "ADAPTERY_ADAPTER_CPU_CACHE_SIZE": str(args.slots),
            "ADAPTERY_PRELOAD_INFERENCE": "true", "PYTHONUNBUFFERED": "1",
        })
        self.replica_ports = [free_port() for _ in range(args.replicas)]
        self.api_port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env=self.env, check=True,
                       capture_output=True)

    def _spawn(self, name: str, port: int, env: dict[str, str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (open for the process's life)
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT))

    def start(self, policy: str) -> None:
        for i, port in enumerate(self.replica_ports):
            metrics = self.workdir / f"metrics-{policy}-{i}"
            shutil.rmtree(metrics, ignore_errors=True)
            metrics.mkdir(parents=True)
            self._spawn(f"replica-{i}", port, {"ADAPTERY_ROLE": "inference", "ADAPTERY_PORT": str(port),
                                                "PROMETHEUS_MULTIPROC_DIR": str(metrics)})
        self._spawn("api", self.api_port, {
            "ADAPTERY_ROLE": "api", "ADAPTERY_ROUTING": policy, "ADAPTERY_ROUTING_POLL_SECONDS": "0.5",
            "ADAPTERY_INFERENCE_URLS": ",".join(f"http://127.0.0.1:{p}" for p in self.replica_ports),
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / f"metrics-{policy}-api")})
        (self.workdir / f"metrics-{policy}-api").mkdir(exist_ok=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                checks = httpx.get(f"{self.url}/ready", timeout=5).json()["checks"]
                if checks["inference"]["up"] == len(self.replica_ports):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tiers not up; see {self.workdir}")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def cold_loads(self) -> int:
        total = 0
        for port in self.replica_ports:
            for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
                if line.startswith("adaptery_adapter_loads_total"):
                    total += int(float(line.rsplit(" ", 1)[1]))
        return total


def make_adapters(tiers: Tiers, tiny_model_dir: Path, count: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    from bench.serving import create_adapters

    folders, _ = create_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiers.workdir / "loras",
                                 count, seed=11)
    names = []
    with httpx.Client(base_url=tiers.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        for i, folder in enumerate(folders):
            parts = [("files", (n, (folder / n).read_bytes()))
                     for n in ("adapter_config.json", "adapter_model.safetensors")]
            answer = client.post("/v1/adapters", data={"name": f"bench-lora-{i:02d}"}, files=parts)
            answer.raise_for_status()
            names.append(answer.json()["name"])
    return names


def workload(names: list[str], requests: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(len(names))]
    return [(rng.choices(names, weights)[0], rng.choice(PROMPTS)) for _ in range(requests)]


def run(tiers: Tiers, policy: str, requests: list[tuple[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    tiers.start(policy)
    try:
        latencies: list[float] = []
        tokens = 0
        replicas: dict[str, int] = {}

        def one(item: tuple[str, str]) -> tuple[float, int, str]:
            model, prompt = item
            started = time.perf_counter()
            answer = client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": args.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]})
            answer.raise_for_status()
            return (time.perf_counter() - started, answer.json()["usage"]["completion_tokens"],
                    answer.headers["x-adaptery-replica"])

        with httpx.Client(base_url=tiers.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as client, \
                ThreadPoolExecutor(args.clients) as pool:
            started = time.perf_counter()
            for latency, generated, replica in pool.map(one, requests):
                latencies.append(latency)
                tokens += generated
                replicas[replica] = replicas.get(replica, 0) + 1
            wall = time.perf_counter() - started
        return {"policy": policy, "cold_loads": tiers.cold_loads(), "wall_s": wall,
                "requests_per_s": len(requests) / wall, "tokens_per_s": tokens / wall,
                "p50_ms": median(latencies) * 1000, "p95_ms": percentile(latencies, 95) * 1000,
                "requests_by_replica": dict(sorted(replicas.items()))}
    finally:
        tiers.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--adapters", type=int, default=30)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--save", action="store_true", help="write bench/results/routing.{json,md}")
    args = parser.parse_args()

    from app.services import base_models
    from app.settings import DEFAULT_BASE_MODEL, Settings
    from tests.tiny_model import build_tiny_model, tiny_model_folder

    settings = Settings()
    default_dir = base_models.local_path(settings, base_models.resolve(settings, DEFAULT_BASE_MODEL))
    tiny = build_tiny_model(tiny_model_folder(ROOT / ".cache" / "models"), default_dir)
    workdir = Path(tempfile.mkdtemp(prefix="adaptery-bench-routing-"))
    tiers = Tiers(workdir, tiny, args)
    try:
        tiers.start("affinity")
        try:
            names = make_adapters(tiers, tiny, args.adapters)
        finally:
            tiers.stop()
        requests = workload(names, args.requests, seed=5)
        results = [run(tiers, policy, requests, args) for policy in ("affinity", "round_robin")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    affinity, round_robin = results
    ratios = {"cold_loads": ratio(affinity["cold_loads"], round_robin["cold_loads"]),
              "requests_per_s": ratio(affinity["requests_per_s"], round_robin["requests_per_s"]),
              "p95_ms": ratio(affinity["p95_ms"], round_robin["p95_ms"])}
    table = md_table(["policy", "cold loads", "requests/s", "tokens/s", "p50 ms", "p95 ms", "requests by replica"],
                     [[r["policy"], r["cold_loads"], f"{r['requests_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                       f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", r["requests_by_replica"]] for r in results]
                     + [["affinity / round robin", f"{ratios['cold_loads']:.2f}", f"{ratios['requests_per_s']:.2f}",
                         "", "", f"{ratios['p95_ms']:.2f}", ""]])
    setup = (f"{args.replicas} inference replicas with {args.slots} adapters of memory each, {args.adapters} "
             f"adapters (Zipf-like), {args.requests} requests from {args.clients} clients, {args.max_tokens} "
             "tokens each, tiny test model")
    print(setup)
    print(table)
    report = {"setup": vars(args), "hardware": hardware(), "results": rounded(results), "ratios": rounded(ratios)}
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "routing.md").write_text(f"{setup}\n\n{table}\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
