"""Training's files: the adapter as served (`save_adapter`), and resumable checkpoints (adapter, trainable
tensors, optimiser, scheduler, RNG and data position), written atomically.

A checkpoint is a folder written under a temporary name, fsynced, renamed into place, and only then
marked complete; resuming takes the newest complete one, so a crash mid-write costs one checkpoint,
never a corrupt resume. Tensors go to safetensors and the rest to JSON (nothing is pickled).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, COMPLETE

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


@dataclass
class ResumeState:
    step: int
    epoch: int  # epoch in progress (0-based)
    batch: int  # batches of that epoch already trained
    trained_tokens: int
    folder: Path
    # The loop's early-stopping state (best_valid_loss, best_step, validations_since_best).
    early_stopping: dict[str, Any] = field(default_factory=dict)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_adapter(model: Any, directory: Path, method: Any) -> None:
    """Write adapter_model.safetensors + adapter_config.json (and nothing pickled), the config as the
    method stores it."""
    was_training = model.training
    model.eval()  # a prompt encoder runs once to produce the saved embeddings: without dropout
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    finally:
        model.train(was_training)
    for extra in directory.iterdir():
        if extra.name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) and extra.is_file():
            extra.unlink()
    config_path = directory / ADAPTER_CONFIG
    config_path.write_text(json.dumps(method.saved_config(json.loads(config_path.read_text())), indent=2))


def save(folder: Path, *, model: Any, method: Any, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
         epoch: int, batch: int, trained_tokens: int, metrics: dict[str, Any], fault: Any = None,
         early_stopping: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step-<step>` under `folder` atomically; returns its path."""
    target = step_folder(folder, step)
    staging = folder / f".writing-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(model, staging, method)  # the servable adapter, as a published one
    tensors, optimizer_json = _optimizer_tensors(optimizer)
    # Every trainable tensor as it is: the saved adapter is what serving needs, which for some methods is
    # less than training needs (P-tuning saves its prompt encoder's output, not the encoder).
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            tensors[f"trainable.{name}"] = parameter.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if fault is not None:
        fault.during_checkpoint(step)  # test-only: die half-way through writing
    save_file(tensors, str(staging / STATE_TENSORS))
    python_state = random.getstate()
    (staging / STATE_JSON).write_text(json.dumps({
        "step": step, "epoch": epoch, "batch": batch, "trained_tokens": trained_tokens, "metrics": metrics,
        "early_stopping": early_stopping or {},
        "optimizer": optimizer_json, "scheduler": scheduler.state_dict(),
        "python_random": [python_state[0], list(python_state[1]), python_state[2]],
    }))
    for item in staging.iterdir():
        _fsync(item)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (target / COMPLETE).write_text("ok\n")
    _fsync(target / COMPLETE)
    _fsync(folder)
    return target


def latest(folder: Path) -> ResumeState | None:
    """The newest complete checkpoint under `folder`, if any (half-written ones are ignored)."""
    if not folder.is_dir():
        return None
    complete = sorted(p for p in folder.glob("step-*") if (p / COMPLETE).is_file())
    if not complete:
        return None
    state = json.loads((complete[-1] / STATE_JSON).read_text())
    return ResumeState(step=state["step"], epoch=state["epoch"], batch=state["batch"],
                       trained_tokens=state["trained_tokens"], folder=complete[-1],
                       early_stopping=state.get("early_stopping", {}))


def step_folder(folder: Path, step: int) -> Path:
    """Where the checkpoint at `step` lives under a job's checkpoint folder."""
    return folder / f"step-{step:08d}"


def load_weights(checkpoint: Path, model: Any, method: Any) -> dict[str, torch.Tensor]:
    """Load a checkpoint's trainable tensors (every one, as training had them) into the model, and what the method
    keeps in the adapter's config (AdaLoRA's rank budget); returns all of the checkpoint's state tensors."""
    from peft import set_peft_model_state_dict

    tensors = load_file(str(checkpoint / STATE_TENSORS))
    trainable = {k.removeprefix("trainable."): v for k, v in tensors.items() if k.startswith("trainable.")}
    if trainable:
        # Not the servable adapter file: that can be less than training holds (AdaLoRA's is cut to its budget).
        missing = set(trainable) - {name for name, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"checkpoint {checkpoint.name} has tensors this model lacks: {sorted(missing)[:3]}")
        with torch.no_grad():
            parameters = dict(model.named_parameters())
            for name, value in trainable.items():
                parameters[name].copy_(value)
    else:  # a checkpoint written before trainable tensors were kept: its adapter is all there is
        set_peft_model_state_dict(model, load_file(str(checkpoint / ADAPTER_WEIGHTS)))
    method.after_loading_checkpoint(model, json.loads((checkpoint / ADAPTER_CONFIG).read_text()))
    return tensors


def restore(resume: ResumeState, *, model: Any, method: Any, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> None:
    """Load adapter weights, optimiser and scheduler state, and the RNG streams of a checkpoint."""
    tensors = load_weights(resume.folder, model, method)
    state = json.loads((resume.folder / STATE_JSON).read_text())
    optimizer_state: dict[str, Any] = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
    for index, scalars in state["optimizer"]["scalars"].items():
        optimizer_state["state"].setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
