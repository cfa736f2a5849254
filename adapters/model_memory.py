"""The memory a base model needs on a device, read from its safetensors headers (no weights loaded), against
the memory the device has free: a model that does not fit is refused before loading, with both figures."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

GIB = 1024**3
# Bytes per parameter as the weights are held: a dtype, or a bitsandbytes quantisation of the linear layers.
BYTES_PER_PARAMETER = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8bit": 1.0, "4bit": 0.5}
# Beyond the weights, serving and training need room for the KV cache, the adapter slots, activations and the
# allocator's slack; a model whose weights alone take more than this share of the free memory is refused.
HEADROOM = 1.2


class ModelTooLarge(MemoryError):
    """A base model that does not fit in the free memory of the device it is to load on."""


# A safetensors header larger than this is refused rather than read (a real one is a few hundred KiB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def safetensors_header(file: Path) -> dict[str, Any]:
    """A safetensors file's header: each tensor's dtype and shape (the file's first bytes; no tensor read)."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"its header claims {size} bytes")
        header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """Every tensor's shape in a model folder's safetensors files, by name (headers only)."""
    return {name: [int(d) for d in tensor["shape"]] for file in sorted(Path(path).glob("*.safetensors"))
            for name, tensor in safetensors_header(file).items()}


def parameter_count(path: str | Path) -> int:
    """Parameters stored in a model folder (a tied head is stored, and counted, once)."""
    return sum(math.prod(shape) for shape in tensor_shapes(path).values())


def weight_bytes(path: str | Path, dtype: str, quantization: str | None = None) -> int:
    """Bytes the model's weights take loaded in `dtype`; with `quantization` ("8bit", "4bit") the 2-D
    projection weights take that many bits and the embeddings, norms and head stay in `dtype`."""
    full = BYTES_PER_PARAMETER[dtype]
    low = BYTES_PER_PARAMETER[quantization] if quantization else full
    total = 0.0
    for name, shape in tensor_shapes(path).items():
        quantised = len(shape) == 2 and "embed" not in name and not name.startswith(("lm_head", "wte", "wpe"))
        total += math.prod(shape) * (low if quantised else full)
    return int(total)


def free_bytes(device: str) -> int:
    """Memory free on `device` now: the GPU's for "cuda[:n]" (from torch where this process has imported it, else
    from nvidia-smi, so that a process that never imports torch, the API role, can ask), the system's available
    memory for the CPU."""
    if device.startswith("cuda"):
        if "torch" in sys.modules:
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        index = device.split(":", 1)[1] if ":" in device else "0"
        try:
            out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.free",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                                 check=True).stdout
            return int(out.strip().splitlines()[0]) * 1024 * 1024
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(path: str | Path, *, device: str, dtype: str, quantization: str | None = None,
               free: int | None = None) -> dict[str, Any]:
    """The model's figures on `device`, or ModelTooLarge naming what it needs and what is free."""
    needed = weight_bytes(path, dtype, quantization)
    available = free_bytes(device) if free is None else free
    held_as = f"{quantization} ({dtype} for the rest)" if quantization else dtype
    if needed * HEADROOM > available:
        raise ModelTooLarge(
            f"the base model at {Path(path).name} needs {needed / GIB:.2f} GiB for its weights in {held_as} "
            f"(plus {HEADROOM - 1:.0%} for the KV cache, adapters and activations: {needed * HEADROOM / GIB:.2f} "
            f"GiB) and {device} has {available / GIB:.2f} GiB free")
    return {"weight_bytes": needed, "free_bytes": available, "dtype": dtype, "quantization": quantization}
