"""Which dtype training computes in on this machine, decided by capability plus a quick one-time probe.

bfloat16 halves the memory traffic and, where the hardware has it natively (GPUs with bf16, CPUs with
AMX or AVX512-BF16), multiplies matmul throughput; where it is emulated (an AVX2-only CPU) it is about
a hundred times slower than float32. So a CPU must both advertise native bf16 and measure it faster
than float32 before training uses it. The probe takes a few tenths of a second and is cached per
process and in a small JSON file keyed by CPU model and torch version.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

# A CPU with any of these /proc/cpuinfo flags has bf16 matmuls in hardware.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bf16 must beat fp32 by this factor to be worth its rounding.
BF16_MIN_SPEEDUP = 1.3


@dataclass(frozen=True)
class ComputePlan:
    dtype: str  # "bfloat16" or "float32"
    reason: str  # one line for the job's events
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:  # not Linux: no flags to go by, so the probe decides alone
        pass
    return model, flags


def matmul_gflops(dtype_name: str, size: int = 768, repeats: int = 4) -> float:
    """Measured matmul throughput on this process's CPU threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: first calls pick kernels
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def _probe_cpu() -> ComputePlan:
    model, flags = _cpu_model_and_flags()
    native = sorted(flags & set(NATIVE_BF16_FLAGS))
    fp32 = matmul_gflops("float32")
    if not native and flags:
        flags_wanted = " or ".join(NATIVE_BF16_FLAGS)
        return ComputePlan("float32", f"float32: this CPU ({model}) has no native bf16 ({flags_wanted})",
                           fp32_gflops=round(fp32, 1))
    bf16 = matmul_gflops("bfloat16")
    faster = bf16 >= BF16_MIN_SPEEDUP * fp32
    why = f"matmul {bf16:.0f} GFLOP/s in bf16 against {fp32:.0f} in fp32"
    if native:
        why += f" ({', '.join(native)})"
    return ComputePlan("bfloat16" if faster else "float32", f"{'bfloat16' if faster else 'float32'}: {why}",
                       fp32_gflops=round(fp32, 1), bf16_gflops=round(bf16, 1))


def _probe(device: str) -> ComputePlan:
    import torch

    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return ComputePlan("bfloat16", f"bfloat16: {torch.cuda.get_device_name(device)} supports it")
        return ComputePlan("float32", f"float32: {torch.cuda.get_device_name(device)} has no bf16")
    return _probe_cpu()


@lru_cache(maxsize=8)
def compute_plan(device: str, setting: str = "auto", cache_dir: Path | None = None) -> ComputePlan:
    """The dtype to train in on `device` ("cpu", "cuda", "cuda:1"): `setting` if it names one, else probed."""
    if setting != "auto":
        return ComputePlan(setting, f"{setting}: set by ADAPTERY_TRAINING_DTYPE")
    import torch

    key = f"{device} {_cpu_model_and_flags()[0]} torch {torch.__version__} threads {torch.get_num_threads()}"
    cache = cache_dir / "compute_plan.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return ComputePlan(**stored["plan"])
        except (OSError, ValueError, TypeError):  # a damaged cache is only a reason to probe again
            pass
    plan = _probe(device)
    if cache is not None:  # written whole, then renamed: a worker and a serving process may probe at once
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "plan": asdict(plan)}))
        os.replace(partial, cache)
    return plan


def serving_dtype(device: str, setting: str = "auto", cache_dir: Path | None = None) -> str:
    """The dtype the serving engine holds a base model in: `setting` if it names one; for "auto", bfloat16 on a
    CUDA device that has it (float16 on one that has not), and on a CPU what training would compute in there
    (`compute_plan`): bfloat16 where the CPU has it natively and measures it faster, float32 otherwise.

    On a CPU with AMX a decode step of 9 rows of SmolLM2-135M takes 61 ms in bf16 against 118 in float32 (32 rows:
    76 against 166), while one row costs the same in both: a batch's extra rows come almost free in bf16, which is
    what keeps one tenant's long generations from slowing another's. Where bf16 is emulated (an AVX2-only CPU) it
    would be a hundred times slower, so there the engine stays in float32, where it matches PEFT to 1e-4."""
    if setting != "auto":
        return setting
    if not device.startswith("cuda"):
        return compute_plan(device, "auto", cache_dir).dtype
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
