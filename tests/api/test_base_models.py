"""Base models the operator registers over the API (/v1/admin/base_models): each check refuses with a 400 naming the
first problem, a model that passes is listed, trained on (its own queue) and shown in /v1/models with its family,
parameters and context length; settings-declared ones cannot be removed over the API, one in use is kept; a model
another process registers is seen within the registry's cache time; and the API role imports no torch."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, chat_file, error_of, in_process_api
from tests.conftest import ADMIN_KEY, ROOT
from tests.tiny_model import TINY_MODEL_ID


@pytest.fixture(scope="module")
def admin(api: Api) -> TestClient:
    return api.as_key(ADMIN_KEY)


def copy_model(source: Path, target: Path, *, drop: tuple[str, ...] = (),
               config: dict[str, Any] | None = None) -> Path:
    """A copy of a model folder without the files in `drop`, its config.json updated with `config` (a None value
    removes the key)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*drop) if drop else None)
    if config is not None and (target / "config.json").exists():
        values = json.loads((target / "config.json").read_text())
        values.update(config)
        values = {key: value for key, value in values.items() if value is not None}
        (target / "config.json").write_text(json.dumps(values))
    return target


def safetensors_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def register(admin: TestClient, model_id: str, source: str | Path) -> Any:
    return admin.post("/v1/admin/base_models", json={"id": model_id, "source": str(source)})


def test_a_checked_model_is_registered_listed_trained_and_removed(api: Api, admin: TestClient, client: TestClient,
                                                                  tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "tiny-copy")
    response = register(admin, "tiny-copy", folder)
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["id"] == "tiny-copy" and created["origin"] == "api" and created["source"] == str(folder)
    assert created["family"] == "llama"
    assert created["parameters"] == safetensors_parameters(tiny_model_dir)
    assert created["context_length"] == 2048
    assert created["chat_template"] == "model"
    assert created["dtype"] == "float32"
    memory = created["memory"]
    assert memory["dtype"] == "float32" and memory["needed_bytes"] == 4 * created["parameters"]
    assert memory["free_bytes"] > memory["needed_bytes"]
    assert {"lora", "ia3"} <= set(created["methods"])

    listed = {m["id"]: m for m in admin.get("/v1/admin/base_models").json()["data"]}
    assert listed["tiny-copy"]["origin"] == "api" and listed["tiny-copy"]["memory"] is None
    assert listed[TINY_MODEL_ID]["origin"] == "settings"

    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    shown = models["tiny-copy"]
    assert {"id", "object", "created", "owned_by"} <= set(shown) and shown["object"] == "model"
    assert shown["owned_by"] == "system"
    assert (shown["family"], shown["parameters"], shown["context_length"]) == (
        "llama", created["parameters"], 2048)
    assert shown["methods"] == created["methods"]
    assert models[TINY_MODEL_ID]["family"] == "llama"
    assert models[TINY_MODEL_ID]["parameters"] == created["parameters"]
    assert client.get("/v1/models/tiny-copy").json()["context_length"] == 2048

    api.broker.take()
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-copy", "training_file": chat_file(client, 8)})
    assert job.status_code == 200, job.text
    assert [m.queue for m in api.broker.take()] == ["train.any.tiny-copy"]

    in_use = admin.delete("/v1/admin/base_models/tiny-copy")
    assert in_use.status_code == 409 and error_of(in_use)["code"] == "base_model_in_use"
    assert client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel").status_code == 200

    removed = admin.delete("/v1/admin/base_models/tiny-copy")
    assert removed.status_code == 200, removed.text
    assert removed.json() == {"id": "tiny-copy", "object": "base_model", "deleted": True}
    assert "tiny-copy" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    refused = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-copy", "training_file": chat_file(client, 8)})
    assert refused.status_code in (400, 404) and error_of(refused)["param"] == "model"
    assert admin.delete("/v1/admin/base_models/tiny-copy").status_code == 404


def test_a_model_without_a_chat_template_gets_the_stated_default(admin: TestClient, tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "plain", drop=("chat_template.jinja", "chat_template.json"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    response = register(admin, "plain-template", folder)
    assert response.status_code == 200, response.text
    assert response.json()["chat_template"] == "default"

    from adapters.base_models import load_tokenizer
    from adapters.data import encode_example

    tokenizer = load_tokenizer(str(folder))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == f"user: hi\nassistant: hello{tokenizer.eos_token}\n"
    encoded = encode_example(tokenizer, {"messages": messages}, "chat")  # renders incrementally: masks work
    assert sum(encoded.loss_mask) > 0
    assert admin.delete("/v1/admin/base_models/plain-template").status_code == 200


@pytest.mark.parametrize(("case", "expected"), [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("relative", "neither an absolute folder path"),
    ("no_config", "no config.json"),
    ("architecture", "unsupported architecture"),
    ("no_tokenizer", "no tokenizer"),
    ("no_weights", "no *.safetensors weights"),
    ("no_context", "states no context length"),
])
def test_each_check_refuses_naming_the_first_problem(admin: TestClient, tiny_model_dir: Path, tmp_path: Path,
                                                     case: str, expected: str) -> None:
    source: str | Path
    if case == "missing":
        source = tmp_path / "nowhere"
    elif case == "file":
        source = tmp_path / "a-file"
        source.write_text("x")
    elif case == "relative":
        source = "models/../tiny"
    elif case == "no_config":
        source = copy_model(tiny_model_dir, tmp_path / case, drop=("config.json",))
    elif case == "architecture":
        source = copy_model(tiny_model_dir, tmp_path / case, config={"model_type": "not-a-family"})
    elif case == "no_tokenizer":
        source = copy_model(tiny_model_dir, tmp_path / case, drop=("tokenizer.json", "tokenizer.model", "vocab.json"))
    elif case == "no_weights":
        source = copy_model(tiny_model_dir, tmp_path / case, drop=("*.safetensors",))
        (source / "pytorch_model.bin").write_bytes(b"not loaded")
    else:
        source = copy_model(tiny_model_dir, tmp_path / case, config={"max_position_embeddings": None})
    response = register(admin, f"refused-{case}", source)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "source" and expected in error["message"], error
    assert f"refused-{case}" not in {m["id"] for m in admin.get("/v1/admin/base_models").json()["data"]}


def test_a_model_that_does_not_fit_is_refused_with_both_figures(admin: TestClient, tiny_model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr("adapters.model_memory.free_bytes", lambda device: 1024)
    response = register(admin, "too-big", copy_model(tiny_model_dir, tmp_path / "big"))
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert "needs" in message and "GiB in float32" in message and "GiB free" in message, message


def test_names_ids_and_declared_models(admin: TestClient, api: Api, tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    assert register(admin, TINY_MODEL_ID, folder).status_code == 409  # a settings-declared id
    assert register(admin, "smollm2-135m-instruct", folder).status_code == 409  # the default's alias
    bad = register(admin, "ft:mine", folder)
    assert bad.status_code == 400 and error_of(bad)["param"] == "id"
    assert api.as_key(None).post("/v1/admin/base_models", json={"id": "x", "source": str(folder)}).status_code == 401
    assert api.client.post("/v1/admin/base_models", json={"id": "x", "source": str(folder)}).status_code == 401
    for declared in (TINY_MODEL_ID, "smollm2-135m-instruct"):
        response = admin.delete(f"/v1/admin/base_models/{declared}")
        assert response.status_code == 409 and error_of(response)["code"] == "base_model_declared"
        assert "settings" in error_of(response)["message"]
    assert register(admin, "org/twice", folder).status_code == 200  # a hub-like id, with a slash
    assert register(admin, "org/twice", folder).status_code == 409
    assert admin.delete("/v1/admin/base_models/org/twice").status_code == 200


def test_a_model_registered_by_another_process_is_seen(api: Api, tiny_model_dir: Path, client: TestClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's registration is a row this process has not written: seen once the registry's cache
    (REGISTRY_CACHE_SECONDS) has run out."""
    import time

    from sqlalchemy import create_engine, text

    from app.services import base_models

    assert "elsewhere" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    engine = create_engine(api.database_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO base_models (id, source, family, parameters, context_length, "
                                "stored_dtype, chat_template, created_at) VALUES ('elsewhere', :source, 'llama', 7, "
                                "2048, 'float32', 1, 0)"), {"source": str(tiny_model_dir)})
    engine.dispose()
    later = time.monotonic() + base_models.REGISTRY_CACHE_SECONDS + 1
    monkeypatch.setattr(base_models.time, "monotonic", lambda: later)
    shown = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert shown["elsewhere"]["parameters"] == 7  # the row's facts, not re-read from the files
    monkeypatch.undo()
    assert api.as_key(ADMIN_KEY).delete("/v1/admin/base_models/elsewhere").status_code == 200


def test_workers_consume_only_models_whose_weights_they_have(api: Api, tiny_model_dir: Path, tmp_path: Path) -> None:
    from app.services import base_models
    from app.services.training_queues import served_base_models
    from app.settings import get_settings

    admin = api.as_key(ADMIN_KEY)
    here = copy_model(tiny_model_dir, tmp_path / "here")
    gone = copy_model(tiny_model_dir, tmp_path / "gone")
    assert register(admin, "on-this-host", here).status_code == 200
    assert register(admin, "on-another-host", gone).status_code == 200
    shutil.rmtree(gone)  # registered from a host that has it; this one does not
    base_models.forget_registered()
    served = served_base_models(get_settings())
    assert "on-this-host" in served and "on-another-host" not in served and TINY_MODEL_ID in served
    for model_id in ("on-this-host", "on-another-host"):
        assert admin.delete(f"/v1/admin/base_models/{model_id}").status_code == 200


API_ROLE_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from fastapi.testclient import TestClient
    from app.cli import prepare_tokenizer
    from app.db.session import migrate_to_head

    migrate_to_head()
    prepare_tokenizer()  # what `adaptery serve --role api` does before it starts the app
    from app.main import create_app

    key = {"Authorization": "Bearer " + os.environ["ADAPTERY_BOOTSTRAP_KEY"]}
    admin = {"Authorization": "Bearer " + os.environ["ADAPTERY_ADMIN_KEY"]}
    with TestClient(create_app(), headers=key) as client:
        from app.services import tokenizers
        assert tokenizers.warm_up.done.wait(120) and tokenizers.warm_up.error is None, tokenizers.warm_up.error
        models = client.get("/v1/models").json()["data"]
        line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        upload = client.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("t.jsonl", ((line + "\\n") * 4).encode())})
        job = client.post("/v1/fine_tuning/jobs", json={"model": "SmolLM2-135M-Instruct",
                                                         "training_file": upload.json()["id"]})
        registered = client.post("/v1/admin/base_models", headers=admin,
                                 json={"id": "tiny", "source": os.environ["TINY_MODEL_DIR"]})
    loaded = sorted(name for name, module in sys.modules.items()
                    if module is not None and (name == "torch" or name.startswith("torch.")))
    cache = Path(os.environ["ADAPTERY_MODEL_CACHE_DIR"])
    print(json.dumps({"torch": loaded, "models": models, "upload": upload.status_code, "job": job.status_code,
                      "job_body": job.text[:300], "registered": registered.status_code,
                      "cache": sorted(p.name for p in cache.iterdir())}))
''')


def test_the_api_role_never_imports_torch_nor_converts_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A fresh data dir and model cache, the packaged default: the API role prepares its tokenizer in a child
    process and never converts the weights; models, an upload's validation, a job's checks and a registration
    all run without torch in the process."""
    env = {**os.environ, "ADAPTERY_ROLE": "api", "ADAPTERY_DATA_DIR": str(tmp_path / "data"),
           "ADAPTERY_MODEL_CACHE_DIR": str(tmp_path / "models"), "ADAPTERY_DATABASE_URL": "",
           "ADAPTERY_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}", "ADAPTERY_BASE_MODELS": "{}",
           "ADAPTERY_DEFAULT_BASE_MODEL": "SmolLM2-135M-Instruct", "ADAPTERY_INFERENCE_URLS": "http://127.0.0.1:9",
           "ADAPTERY_INTERNAL_KEY": "internal-test-key", "ADAPTERY_BOOTSTRAP_KEY": "sk-ady-api-role-test-key",
           "ADAPTERY_ADMIN_KEY": ADMIN_KEY, "TINY_MODEL_DIR": str(tiny_model_dir)}
    done = subprocess.run([sys.executable, "-c", API_ROLE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] == [], report["torch"]
    default = next(m for m in report["models"] if m["id"] == "SmolLM2-135M-Instruct")
    assert default["family"] == "llama" and default["context_length"] == 8192
    assert 130_000_000 < default["parameters"] < 140_000_000
    assert report["upload"] == 200 and report["job"] == 200, report["job_body"]
    assert report["registered"] == 200
    assert "SmolLM2-135M-Instruct.tokenizer" in report["cache"]  # the tokenizer alone
    assert "SmolLM2-135M-Instruct" not in report["cache"]  # no converted weights


def test_a_declared_base_model_of_an_unsupported_family_stops_the_start(tmp_path: Path, tiny_model_dir: Path) -> None:
    """ADAPTERY_BASE_MODELS is registration too: a family the engine cannot serve is refused when the service
    starts, naming the model and the reason, not at its first chat."""
    folder = tmp_path / "a-mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    declared = {TINY_MODEL_ID: str(tiny_model_dir), "a-mamba": str(folder)}
    with pytest.raises(RuntimeError, match=r"ADAPTERY_BASE_MODELS names 'a-mamba' .* cannot be served: .*mamba"), \
            in_process_api(tmp_path, tiny_model_dir, {"ADAPTERY_BASE_MODELS": json.dumps(declared)}):
        pass
