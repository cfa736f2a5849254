"""Importing adapters trained elsewhere, against the real app in this process: accepted in every legitimate shape,
served (by the serving engine, in this process) exactly as PEFT computes them; pickles, path tricks, links, zip
bombs and do-nothing adapters refused."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from adapters.methods import METHODS
from tests.api.adapters_made_with_peft import (
    CONFIG,
    WEIGHTS,
    files_of,
    greedy_text,
    save_lora,
    send_archive,
    send_files,
    tar_of,
    zip_of,
)
from tests.tiny_model import TINY_MODEL_ID


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A LoRA made with PEFT outside Adaptery: random, non-zero weights (init_lora_weights=False)."""
    return save_lora(tiny_model_dir, tmp_path_factory.mktemp("outside"),
                     target_modules=("q_proj", "v_proj", "down_proj"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_imports_and_serves_as_peft_computes_it(client: TestClient, tiny_model_dir: Path,
                                                             tiny_tokenizer: Any, tmp_path: Path, name: str) -> None:
    """An adapter of each registered method, made with PEFT outside Adaptery, passes the same gate and is
    served token for token as PEFT computes it."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.base_models import base_info
    from app.settings import Settings

    method = METHODS[name]
    hp = method.resolve({}, n_examples=8, settings=Settings(), base_info=base_info(str(tiny_model_dir)))
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), method.peft_config(hp, total_steps=10))
    with torch.no_grad():  # weights far from their initial values (PEFT's inits are often a no-op on purpose)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(tmp_path)
    response = send_files(client, files_of(tmp_path), name=f"outside-{name}")
    assert response.status_code == 200, response.text
    assert response.json()["method"] == name
    reply = client.post("/v1/chat/completions", json={"model": f"outside-{name}", "max_tokens": 6, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Hello"}]})
    assert reply.status_code == 200, reply.text
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path)).eval()
    assert greedy_text(reference, tiny_tokenizer, "Hello", reply.json()["usage"]["completion_tokens"]) == \
        reply.json()["choices"][0]["message"]["content"]


def test_import_serve_and_download(client: TestClient, peft_adapter: Path, tiny_model_dir: Path,
                                   tiny_tokenizer: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    response = send_files(client, files_of(peft_adapter), name="acme-lora-v1")
    assert response.status_code == 200, response.text
    adapter = response.json()
    assert adapter["name"] == "acme-lora-v1" and adapter["method"] == "lora" and adapter["rank"] == 4
    assert adapter["base_model"] == TINY_MODEL_ID and adapter["job_id"] is None

    reply = client.post("/v1/chat/completions", json={"model": "acme-lora-v1", "max_tokens": 6, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Hello"}]})
    assert reply.status_code == 200, reply.text
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(peft_adapter))
    assert greedy_text(reference, tiny_tokenizer, "Hello", reply.json()["usage"]["completion_tokens"]) == \
        reply.json()["choices"][0]["message"]["content"]

    before = set(Path(tempfile.gettempdir()).glob("adaptery-download-*"))
    archive = client.get(f"/v1/adapters/{adapter['id']}/content")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    # Sent from a temporary file (never whole in memory), which is gone once sent.
    assert int(archive.headers["content-length"]) == len(archive.content)
    assert set(Path(tempfile.gettempdir()).glob("adaptery-download-*")) == before
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
        assert sorted(zipped.namelist()) == [CONFIG, WEIGHTS]
        assert zipped.read(WEIGHTS) == (peft_adapter / WEIGHTS).read_bytes()
        stored_config = json.loads(zipped.read(CONFIG))
    assert "base_model_name_or_path" not in stored_config  # never kept, never fetched
    assert send_files(client, files_of(peft_adapter), name="acme-lora-v1").status_code == 409


def test_import_from_an_archive(client: TestClient, peft_adapter: Path) -> None:
    response = send_archive(client, zip_of(files_of(peft_adapter)), "adapter.bin-free")
    assert response.status_code == 200, response.text
    assert response.json()["name"].startswith(f"imported:{TINY_MODEL_ID}:")


class MarkerOnUnpickle:
    """Unpickling this creates a file: proof that something unpickled the upload."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_pickles_are_refused_in_every_disguise(client: TestClient, peft_adapter: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"  # the app runs in this process: any unpickling of the upload creates it here
    payload = pickle.dumps(MarkerOnUnpickle(str(marker)))
    config = (peft_adapter / CONFIG).read_bytes()
    attempts = [
        send_files(client, {CONFIG: config, "adapter_model.bin": payload}),
        send_files(client, {CONFIG: config, "adapter_model.pt": payload}),
        send_files(client, {CONFIG: config, WEIGHTS: payload}),  # renamed to .safetensors
        send_files(client, {CONFIG: payload, WEIGHTS: (peft_adapter / WEIGHTS).read_bytes()}),
        send_archive(client, zip_of({CONFIG: config, WEIGHTS: payload})),
        send_archive(client, zip_of({CONFIG: config, "adapter_model.pkl": payload})),
        send_archive(client, payload, "a.pt"),
    ]
    for response in attempts:
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert not marker.exists()


def test_paths_links_and_bombs_are_refused(client: TestClient, peft_adapter: Path) -> None:
    good = files_of(peft_adapter)
    cases = {
        "parent dir": zip_of({"../" + CONFIG: good[CONFIG], WEIGHTS: good[WEIGHTS]}),
        "absolute": zip_of({"/tmp/" + CONFIG: good[CONFIG], WEIGHTS: good[WEIGHTS]}),
        "nested": zip_of({"sub/" + CONFIG: good[CONFIG], WEIGHTS: good[WEIGHTS]}),
        "extra file": zip_of({**good, "run.sh": b"#!/bin/sh\n"}),
        "symlink": zip_of(good, link="evil"),
        "too many": zip_of({f"f{i}.txt": b"x" for i in range(20)}),
        "not an archive": b"plain bytes",
    }
    for case, archive in cases.items():
        response = send_archive(client, archive, "a.zip")
        assert response.status_code == 400, (case, response.text)
    # A zip bomb: 100 MB of zeros in about 100 KB, past the 64 MB limit the test app runs with.
    bomb = zip_of({CONFIG: good[CONFIG], WEIGHTS: bytes(100 * 1024 * 1024)})
    assert len(bomb) < 1024 * 1024
    response = send_archive(client, bomb, "bomb.zip")
    assert response.status_code == 413 and response.json()["error"]["code"] == "adapter_too_large"
    traversal_name = send_files(client, {"../../" + CONFIG: good[CONFIG], WEIGHTS: good[WEIGHTS]})
    assert traversal_name.status_code == 400
    bad_name = send_files(client, good, name="../../etc/passwd")
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"


def test_adapters_that_do_not_fit_or_do_nothing_are_refused(client: TestClient, peft_adapter: Path,
                                                            tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    good = files_of(peft_adapter)
    config = json.loads(good[CONFIG])
    for change, fragment in [({"peft_type": "LOHA"}, "not supported"), ({"r": 4096}, "rank")]:
        response = send_files(client, {CONFIG: json.dumps({**config, **change}).encode(), WEIGHTS: good[WEIGHTS]})
        assert response.status_code == 400 and fragment in response.json()["error"]["message"], response.text
    # Another registered method's config over LoRA weights: the weights do not fit what the config says.
    response = send_files(client, {CONFIG: json.dumps({**config, "peft_type": "IA3"}).encode(), WEIGHTS: good[WEIGHTS]})
    assert response.status_code == 422 and "no IA³ vectors" in response.json()["error"]["message"], response.text
    # Weights for a model with other dimensions.
    other = save_lora(tiny_model_dir, tmp_path / "other", lora_alpha=8, target_modules=("q_proj",))
    tensors = {k: torch.randn(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v
               for k, v in load_file(str(other / WEIGHTS)).items()}
    save_file(tensors, str(other / WEIGHTS))
    misfit = send_files(client, files_of(other))
    assert misfit.status_code == 422 and "do not fit" in misfit.json()["error"]["message"], misfit.text
    # A LoRA straight from PEFT's default init has B = 0: it changes nothing, and is refused.
    zero = save_lora(tiny_model_dir, tmp_path / "zero", target_modules=("q_proj",), random_weights=False)
    response = send_files(client, files_of(zero))
    assert response.status_code == 422 and "does not change" in response.json()["error"]["message"], response.text
    assert send_files(client, {CONFIG: good[CONFIG]}).status_code == 400  # a file missing


# ------------------------------------------------------------------ hostile configs and archives


def with_config(files: dict[str, bytes], **change: Any) -> dict[str, bytes]:
    """`files` with keys of adapter_config.json changed."""
    return {**files, CONFIG: json.dumps({**json.loads(files[CONFIG]), **change}).encode()}


def test_config_regexes_are_refused_never_run(peft_adapter: Path, client: TestClient) -> None:
    """PEFT reads pattern keys and a string target_modules as regular expressions; an import keeps only names of
    the base model's modules, compared as strings, and refuses anything else with a 422 naming the field."""
    good = files_of(peft_adapter)
    cases = [
        ("alpha_pattern", {"alpha_pattern": {r"layers\.0\..*_proj": 16}}),
        ("alpha_pattern", {"alpha_pattern": {"q_pro.": 16}}),  # '.' is a character here, not a wildcard
        ("rank_pattern", {"rank_pattern": {"(q|v)_proj": 4}}),
        ("target_modules", {"target_modules": ".*(q_proj|v_proj)"}),
    ]
    for field, change in cases:
        response = send_files(client, with_config(good, **change))
        assert response.status_code == 422, (change, response.text)
        message = response.json()["error"]["message"]
        assert f"{CONFIG}: {field}" in message and "not regular expressions" in message, message


def test_literal_patterns_are_served_as_peft_computes_them(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                            tmp_path: Path, client: TestClient) -> None:
    """Pattern keys that name modules (a suffix, a full name) keep PEFT's meaning, in the engine and in PEFT
    reading the stored config back (as the evaluation worker does)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        alpha_pattern={"q_proj": 32, "model.layers.1.self_attn.v_proj": 2},
                        rank_pattern={"layers.0.self_attn.v_proj": 2})
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(tmp_path / "saved")
    response = send_files(client, files_of(tmp_path / "saved"), name="literal-patterns")
    assert response.status_code == 200, response.text
    reply = client.post("/v1/chat/completions", json={"model": "literal-patterns", "max_tokens": 6, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Hello"}]})
    assert reply.status_code == 200, reply.text
    served = reply.json()["choices"][0]["message"]["content"]
    n = reply.json()["usage"]["completion_tokens"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          str(tmp_path / "saved")).eval()
    assert greedy_text(reference, tiny_tokenizer, "Hello", n) == served
    # The stored config, read back by PEFT, means the same.
    archive = client.get(f"/v1/adapters/{response.json()['id']}/content")
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
        zipped.extractall(tmp_path / "stored")
    stored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(tmp_path / "stored")).eval()
    assert greedy_text(stored, tiny_tokenizer, "Hello", n) == served


def test_the_loader_never_runs_a_config_regex(peft_adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A stored config whose pattern key backtracks catastrophically on module names is refused by the engine's
    loader at once. The load runs in a child process: before the fix it held the GIL for minutes."""
    import shutil
    import subprocess
    import sys

    from tests.budgets import budget

    folder = tmp_path / "evil"
    shutil.copytree(peft_adapter, folder)
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "alpha_pattern": {"(.|.)*X": 16}}))
    script = (
        "from pathlib import Path\n"
        "from transformers import AutoConfig\n"
        "from adapters.engine.adapter_loader import AdapterLoadError, load_adapter\n"
        f"model_config = AutoConfig.from_pretrained({str(tiny_model_dir)!r})\n"
        "try:\n"
        f"    load_adapter(Path({str(folder)!r}), key='evil', model_config=model_config, max_rank=64)\n"
        "except AdapterLoadError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('loaded')\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=budget(10),
                              cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        pytest.fail("loading the adapter ran its alpha_pattern key as a regular expression")
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "alpha_pattern" in done.stdout, done.stdout


def test_an_imported_adapter_is_never_trained_further(peft_adapter: Path, client: TestClient) -> None:
    """The worker never gives PEFT an imported config: a job cannot start from an imported adapter."""
    from tests.api.conftest import chat_file, error_of

    imported = send_files(client, files_of(peft_adapter), name="imported-not-trainable")
    assert imported.status_code == 200, imported.text
    job = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": chat_file(client),
                                                    "from_model": "imported-not-trainable"})
    assert job.status_code == 400 and error_of(job)["param"] == "from_model", job.text


def pax_bomb(members: dict[str, bytes], header_bytes: int) -> bytes:
    """A tar.gz of `members` behind a pax header record of `header_bytes` (a long path), which gzip shrinks
    about a thousandfold and tarfile reads whole into memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        long = tarfile.TarInfo("x")
        long.pax_headers = {"path": "a" * header_bytes}
        tar.addfile(long, io.BytesIO(b""))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def peak_bytes_of(action: Any) -> tuple[int, Any]:
    """The peak of Python's allocations while `action` runs, and what it raised (None if nothing)."""
    import tracemalloc

    tracemalloc.start()
    raised = None
    try:
        action()
    except Exception as exc:  # the refusal is what the caller checks
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


def test_tar_is_refused_without_reading_its_headers(peft_adapter: Path, client: TestClient) -> None:
    """Only zip is accepted: tarfile reads pax and GNU long-name records whole before any check can run."""
    from app.errors import DomainError
    from app.services.adapter_import import unpack

    good = files_of(peft_adapter)
    bomb = pax_bomb(good, 32 * 1024 * 1024)
    assert len(bomb) < 1024 * 1024
    peak, raised = peak_bytes_of(lambda: unpack(bomb, 64 * 1024 * 1024))
    assert peak < 4 * 1024 * 1024, f"refusing a {len(bomb)}-byte tar took {peak} bytes"
    assert isinstance(raised, DomainError), raised
    response = send_archive(client, tar_of(good), "adapter.tar.gz")
    assert response.status_code == 400 and response.json()["error"]["param"] == "file", response.text
    assert "zip" in response.json()["error"]["message"]


def test_zip_directories_and_members_are_bounded(peft_adapter: Path, client: TestClient) -> None:
    from app.errors import DomainError
    from app.services.adapter_import import unpack

    good = files_of(peft_adapter)
    # 50,000 entries: their central directory is refused before it is parsed (each parsed entry is an object).
    crowded = zip_of({f"{i}": b"" for i in range(50_000)})
    peak, raised = peak_bytes_of(lambda: unpack(crowded, 64 * 1024 * 1024))
    assert peak < 4 * 1024 * 1024, f"refusing a {len(crowded)}-byte zip took {peak} bytes"
    assert isinstance(raised, DomainError), raised
    # Compression other than deflate may unpack a whole block at once, past any budget: refused by name.
    lzma = io.BytesIO()
    with zipfile.ZipFile(lzma, "w", zipfile.ZIP_LZMA) as zipped:
        for name, data in good.items():
            zipped.writestr(name, data)
    response = send_archive(client, lzma.getvalue())
    assert response.status_code == 400 and "deflate" in response.json()["error"]["message"], response.text
    # An encrypted member, and a member whose bytes do not match its checksum: a 400, never a 500.
    stored_zip = io.BytesIO()  # not deflated, so a byte of the config can be changed in place
    with zipfile.ZipFile(stored_zip, "w", zipfile.ZIP_STORED) as zipped:
        for name, data in good.items():
            zipped.writestr(name, data)
    corrupt = stored_zip.getvalue().replace(b"lora_alpha", b"LORA_ALPHA", 1)
    encrypted = bytearray(stored_zip.getvalue())  # zipfile writes no encryption: set the flag in every header
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = encrypted.find(signature)
        while at >= 0:
            encrypted[at + flags_at] |= 0x1
            at = encrypted.find(signature, at + 4)
    plain = TestClient(client.app, raise_server_exceptions=False, headers=client.headers)  # a 500 as a client sees it
    for case, archive in {"encrypted": bytes(encrypted), "bad checksum": corrupt}.items():
        response = send_archive(plain, archive)
        assert response.status_code == 400 and response.json()["error"]["param"] == "file", (case, response.text)


def test_a_failed_import_leaves_nothing_behind(peft_adapter: Path, client: TestClient, tiny_model_dir: Path,
                                               tmp_path: Path) -> None:
    """Neither a residency record nor weights in memory nor a stored folder stays behind a refused import."""
    from safetensors.torch import load_file, save_file

    from adapters.store import ArtifactStore
    from app.services.inference import get_engine
    from app.settings import get_settings

    settings = get_settings()
    runtime = get_engine(settings).runtime(TINY_MODEL_ID)
    adapters_dir = ArtifactStore.for_settings(settings).root / "adapters"
    before = ({r.key for r in runtime.adapters.residencies()}, set(runtime.adapters.in_memory_keys()),
              set(adapters_dir.iterdir()) if adapters_dir.exists() else set())
    misfit = save_lora(tiny_model_dir, tmp_path / "misfit", target_modules=("q_proj",))
    tensors = {k: torch.randn(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v
               for k, v in load_file(str(misfit / WEIGHTS)).items()}
    save_file(tensors, str(misfit / WEIGHTS))
    zero = save_lora(tiny_model_dir, tmp_path / "zero", target_modules=("q_proj",), random_weights=False)
    for folder in (misfit, zero):  # one fails to load, one loads and then does nothing
        assert send_files(client, files_of(folder)).status_code == 422
    after = ({r.key for r in runtime.adapters.residencies()}, set(runtime.adapters.in_memory_keys()),
             set(adapters_dir.iterdir()) if adapters_dir.exists() else set())
    assert after == before
