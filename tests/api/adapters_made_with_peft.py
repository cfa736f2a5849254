"""Adapters for the tiny model made with PEFT outside Adaptery, and the ways a client sends them to
POST /v1/adapters: loose files, a zip (and a tar.gz, which is refused). Shared by the fast tier's import, security
and fuzz tests."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Any

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def save_lora(tiny_model_dir: Path, folder: Path, *, seed: int = 0, r: int = 4, lora_alpha: int = 8,
              target_modules: tuple[str, ...] = ("q_proj", "v_proj"), random_weights: bool = True) -> Path:
    """A LoRA for the tiny model saved by PEFT into `folder`. random_weights: random, non-zero weights
    (init_lora_weights=False); without it PEFT's default init, B = 0 (an adapter that changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                        **({"init_lora_weights": False} if random_weights else {}))
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(folder)
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    """The two files PEFT saves, by name."""
    return {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: (folder / WEIGHTS).read_bytes()}


def zip_of(members: dict[str, bytes], link: str | None = None) -> bytes:
    """A zip of `members`; with `link`, also a symbolic link of that name to /etc/passwd."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zipped.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def tar_of(members: dict[str, bytes], link: str | None = None) -> bytes:
    """A tar.gz of `members`; with `link`, also a symbolic link of that name to /etc/passwd."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def adapter_archives(tiny_model_dir: Path, folder: Path, count: int = 2) -> list[bytes]:
    """Zips of `count` different LoRAs (seeds 0, 1, ...) for the tiny model, each as PEFT saved it."""
    return [zip_of(files_of(save_lora(tiny_model_dir, folder / f"lora-{seed}", seed=seed)))
            for seed in range(count)]


def send_files(client: Any, parts: dict[str, bytes], **form: str) -> Any:
    """POST /v1/adapters with loose files (each a `files` part named as the file), and form fields."""
    return client.post("/v1/adapters", data=form, files=[("files", (name, data)) for name, data in parts.items()])


def send_archive(client: Any, archive: bytes, filename: str = "adapter.zip") -> Any:
    """POST /v1/adapters with one archive (the `file` part)."""
    return client.post("/v1/adapters", files={"file": (filename, archive)})


def greedy_text(model: Any, tokenizer: Any, content: str, n: int) -> str:
    """The model's greedy continuation of a one-message chat, by a full forward pass per token."""
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(n):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return str(tokenizer.decode(sequence[len(ids):], skip_special_tokens=True))
