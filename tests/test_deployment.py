"""The deployment files, read by the real tools: docker-compose.yml through `docker-compose config` (Debian's
docker-compose; `config` needs no engine), the Dockerfile through the `dockerfile` package (Docker's own Go
parser). No Docker engine runs here, so nothing is built or started; what can be checked without one is."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings

# End-to-end tier: the real docker-compose and Dockerfile tools check the deployment files.
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


SECRETS = ("POSTGRES_PASSWORD", "MINIO_PASSWORD", "OBJECT_STORE_SECRET", "ADAPTERY_INTERNAL_KEY")


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        raise RuntimeError("docker-compose is not installed: `make test` installs it as root "
                           "(`apt-get install -y docker-compose`)")
    # Only the env file speaks: none of these variables may come from the environment the tests run in.
    environment = {name: value for name, value in os.environ.items() if name not in SECRETS}
    return subprocess.run([tool, "--env-file", str(env_file), "config"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=environment)


def filled_env_file(folder: Path) -> Path:
    """.env.example with a fresh random secret in each of its secrets, as its first lines tell an operator to do."""
    lines = [f"{line}{secrets.token_urlsafe(32)}" if line.split("=")[0] in SECRETS else line
             for line in (ROOT / ".env.example").read_text().splitlines()]
    target = folder / ".env"
    target.write_text("\n".join(lines) + "\n")
    return target


def compose_config(folder: Path) -> dict[str, Any]:
    done = run_compose_config(filled_env_file(folder))
    assert done.returncode == 0, done.stderr
    parsed = yaml.safe_load(done.stdout)
    assert isinstance(parsed, dict)
    return parsed


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compose_config(tmp_path_factory.mktemp("compose"))


def test_compose_has_no_default_secrets(tmp_path: Path, compose: dict[str, Any]) -> None:
    """Every secret must be set: compose refuses the example file as it is, naming what is missing, and no Adaptery
    service holds the object store's root credentials."""
    done = run_compose_config(ROOT / ".env.example")
    assert done.returncode != 0
    assert any(name in done.stderr for name in SECRETS), done.stderr
    services = compose["services"]
    root_password = services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    for name in ("api", "inference-1", "inference-2", "worker", "worker-gpu", "migrate"):
        environment = services[name]["environment"]
        assert environment["AWS_ACCESS_KEY_ID"] != services["minio"]["environment"]["MINIO_ROOT_USER"], name
        assert root_password not in environment.values(), name
        assert len(environment["ADAPTERY_INTERNAL_KEY"]) >= 32, name


def volume_target(volume: str | dict[str, Any]) -> str:
    """Where a service volume is mounted (compose writes `name:/path:rw` or the long form)."""
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def test_compose_services_health_checks_and_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "minio", "bucket", "migrate", "api", "inference-1", "inference-2", "worker",
            "worker-gpu"} <= set(services)
    for name in ("postgres", "redis", "minio", "api", "inference-1", "inference-2"):
        assert "healthcheck" in services[name], name
    for name in ("api", "inference-1", "inference-2", "worker", "worker-gpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert services[name]["depends_on"]["bucket"]["condition"] == "service_completed_successfully", name
        # Nothing shared on disk: artifacts go through the object store.
        assert not services[name].get("volumes"), name
        assert services[name]["environment"]["ADAPTERY_ARTIFACT_STORE_URL"].startswith("s3://"), name
        assert services[name]["environment"]["ADAPTERY_S3_ENDPOINT_URL"] == "http://minio:9000", name
    for name in ("worker", "worker-gpu"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Only the one-shot service migrates; replicas refuse an old schema rather than race to change it.
    assert services["migrate"]["command"] == ["adaptery", "migrate"]
    for name in ("api", "inference-1", "inference-2"):
        assert "--no-migrate" in services[name]["command"], name


def test_the_api_tier_routes_to_the_inference_tier(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api = services["api"]
    assert api["command"][api["command"].index("--role") + 1] == "api"
    listed = api["environment"]["ADAPTERY_INFERENCE_URLS"].split(",")
    replicas = [name for name, service in services.items() if "--role" in service.get("command", [])
                and service["command"][service["command"].index("--role") + 1] == "inference"]
    assert sorted(replicas) == ["inference-1", "inference-2"]
    assert sorted(listed) == [f"http://{name}:8000" for name in sorted(replicas)]  # every replica, by name
    assert api["depends_on"]["inference-1"]["condition"] == "service_healthy"
    for name in ("api", *replicas):
        assert services[name]["environment"]["ADAPTERY_INTERNAL_KEY"], name  # the shared secret is set
    assert "ports" not in services["inference-1"]  # only the API is published


def test_redis_keeps_celerys_messages(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert volume_target(compose["services"]["redis"]["volumes"][0]) == "/data"


def test_gpu_worker_reserves_the_gpus_and_declares_its_class(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["ADAPTERY_WORKER_DEVICE_CLASS"] == "gpu"
    assert compose["services"]["worker"]["environment"]["ADAPTERY_WORKER_DEVICE_CLASS"] == "cpu"
    # Started only with `--profile gpu`; everything else starts without a profile.
    assert gpu["profiles"] == ["gpu"]
    assert [name for name, service in compose["services"].items() if service.get("profiles")] == ["worker-gpu"]


def test_every_setting_the_deployment_names_exists() -> None:
    """An ADAPTERY_ variable that Settings does not know would be silently ignored: refuse typos here."""
    known = {f"ADAPTERY_{name.upper()}" for name in Settings.model_fields}
    named = set(re.findall(r"\bADAPTERY_[A-Z0-9_]+", (ROOT / "docker-compose.yml").read_text()
                           + (ROOT / ".env.example").read_text() + (ROOT / "Dockerfile").read_text()))
    named.discard("ADAPTERY_GPUS_PER_WORKER")  # compose's own variable, mapped to ADAPTERY_TRAINING_PROCESSES
    assert named and named <= known, named - known


def test_dockerfile_builds_in_stages_prepares_the_model_and_runs_unprivileged() -> None:
    import dockerfile

    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    stages = [c for c in commands if c.cmd == "FROM"]
    assert len(stages) == 2 and [s.value[-1] for s in stages] == ["build", "runtime"]
    runtime = commands[commands.index(stages[1]):]
    build = commands[:commands.index(stages[1])]
    assert any("adaptery prepare-model" in " ".join(c.value) for c in build if c.cmd == "RUN")
    copied = [c.value for c in runtime if c.cmd == "COPY"]
    assert all(any(flag.startswith("--from=build") for flag in c.flags) for c in runtime if c.cmd == "COPY")
    assert ["/opt/models", "/opt/models"] in [list(v) for v in copied]
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")
    args = {c.value[0].split("=")[0] for c in commands if c.cmd == "ARG"}
    assert {"TORCH_SPEC", "TORCH_INDEX"} <= args  # a CUDA build is a build argument away
    # Every folder the package needs is copied into the build.
    sources = {c.value[0] for c in build if c.cmd == "COPY"}
    assert {"app", "workers", "adapters", "pyproject.toml"} <= sources
