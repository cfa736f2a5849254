"""Where training work waits: one queue per device class and base model, `train.<class>.<model>`, with
`train.any.<model>` for jobs that did not ask for a class, and which of them a worker consumes."""

from __future__ import annotations

import glob
from typing import Any

ANY_DEVICE = "any"
DEVICE_CLASSES = ("cpu", "gpu")


def training_queue(base_model: str, device_class: str | None) -> str:
    """The queue a job (or an evaluation, which asks for no class) waits in."""
    return f"train.{device_class or ANY_DEVICE}.{base_model}"


def worker_device_class(settings: Any) -> str:
    """The class this worker declares: ADAPTERY_WORKER_DEVICE_CLASS, or for "auto" gpu when the host shows
    NVIDIA devices and ADAPTERY_DEVICE does not pin the CPU. Read without importing torch: the worker's
    parent process forks its pool and must not initialise CUDA."""
    if settings.worker_device_class != "auto":
        return str(settings.worker_device_class)
    if settings.device == "cpu":
        return "cpu"
    return "gpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu"


def served_base_models(settings: Any) -> list[str]:
    """ADAPTERY_WORKER_BASE_MODELS (comma-separated), or every registered base model whose weights this host has
    when empty (a folder registered for other hosts is left to them); an unknown name, or a named one without its
    weights here, is an error naming the registered ones."""
    from app.services import base_models

    models = base_models.registry(settings)
    registered = list(models)
    wanted = [name.strip() for name in settings.worker_base_models.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in registered]
    if unknown:
        raise ValueError(f"ADAPTERY_WORKER_BASE_MODELS names {unknown}, which are not registered base models; "
                         f"registered: {', '.join(registered)}")
    missing = [name for name in wanted if not base_models.weights_on_this_host(models[name])]
    if missing:
        raise ValueError(f"ADAPTERY_WORKER_BASE_MODELS names {missing}, whose folders are not on this host: "
                         + ", ".join(models[name].source for name in missing))
    return wanted or [name for name in registered if base_models.weights_on_this_host(models[name])]


def worker_queues(settings: Any) -> list[str]:
    """What a worker consumes: for each base model it serves, its own class's queue and the any-class one."""
    device_class = worker_device_class(settings)
    return [training_queue(model, cls) for model in served_base_models(settings) for cls in (device_class, None)]
