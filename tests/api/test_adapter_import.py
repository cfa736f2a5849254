"""Importing adapters trained elsewhere, against the real app in this process: accepted in every legitimate shape,
served (by the serving engine, in this process) exactly as PEFT computes them; pickles, path tricks, links, zip
bombs and do-nothing adapters refused."""

from __future__ import annotations

import io
import json
import pickle
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


def greedy_text(model: Any, tokenizer: Any, content: str, n: int) -> str:
    """The model's greedy continuation of a one-message chat, by a full forward pass per token."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(n):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return str(tokenizer.decode(sequence[len(ids):], skip_special_tokens=True))


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

    archive = client.get(f"/v1/adapters/{adapter['id']}/content")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
        assert sorted(zipped.namelist()) == [CONFIG, WEIGHTS]
        assert zipped.read(WEIGHTS) == (peft_adapter / WEIGHTS).read_bytes()
        stored_config = json.loads(zipped.read(CONFIG))
    assert "base_model_name_or_path" not in stored_config  # never kept, never fetched
    assert send_files(client, files_of(peft_adapter), name="acme-lora-v1").status_code == 409


@pytest.mark.parametrize("packer", [zip_of, tar_of], ids=["zip", "tar.gz"])
def test_import_from_an_archive(client: TestClient, peft_adapter: Path, packer: Any) -> None:
    response = send_archive(client, packer(files_of(peft_adapter)), "adapter.bin-free")
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
        "symlink": tar_of(good, link="evil"),
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
