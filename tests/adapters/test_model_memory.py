"""Base models against the memory they need and the dtype they are held in: a model that does not fit is refused
before loading with both figures; the serving dtype follows the device; a quantised base needs CUDA; a model held
in bf16 serves every method (the GPU's serving dtype, here on the CPU)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.base_models import load_model
from adapters.compute import serving_dtype
from adapters.engine import AdapterRef, BaseRuntime
from adapters.methods import METHODS
from adapters.model_memory import GIB, HEADROOM, ModelTooLarge, check_fits, parameter_count, weight_bytes
from tests.adapters.test_engine import PROMPT, trained  # noqa: F401 (a fixture)


def test_parameters_and_bytes_come_from_the_headers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert parameter_count(tiny_model_dir) == sum(p.numel() for p in model.parameters())
    fp32, bf16 = weight_bytes(tiny_model_dir, "float32"), weight_bytes(tiny_model_dir, "bfloat16")
    assert fp32 == 4 * parameter_count(tiny_model_dir) and bf16 == fp32 // 2
    # 4-bit: the projections at half a byte a weight, embeddings, head and norms stay in the compute dtype.
    projections = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.startswith("lm_head"))
    assert weight_bytes(tiny_model_dir, "bfloat16", "4bit") == bf16 - math.ceil(1.5 * projections)


def test_a_model_that_does_not_fit_is_refused_with_both_figures(tiny_model_dir: Path) -> None:
    needed = weight_bytes(tiny_model_dir, "float32")
    with pytest.raises(ModelTooLarge) as refused:
        check_fits(tiny_model_dir, device="cpu", dtype="float32", free=needed)  # no room for the KV cache
    message = str(refused.value)
    assert f"{needed / GIB:.2f} GiB" in message and f"{needed / GIB:.2f} GiB free" in message and "float32" in message
    figures = check_fits(tiny_model_dir, device="cpu", dtype="float32", free=int(needed * HEADROOM) + 1)
    assert figures["weight_bytes"] == needed


def test_load_model_checks_before_reading_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("adapters.model_memory.free_bytes", lambda device: 1024)
    loaded: list[Any] = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(ModelTooLarge, match="cpu has 0.00 GiB free"):
        load_model(str(tiny_model_dir), device="cpu")
    assert loaded == []


def test_serving_dtype_and_quantisation_follow_the_device(tiny_model_dir: Path) -> None:
    assert serving_dtype("cpu") == "float32"  # the CPU engine matches PEFT to 1e-4 in float32
    assert serving_dtype("cpu", "bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        load_model(str(tiny_model_dir), device="cpu", quantization="4bit")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_bf16_base_serves_every_method(method: str, trained: dict[str, Path],  # noqa: F811
                                         tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """The dtype a GPU serves in: adapter weights kept in float32 (a prefix's keys and values) must take the
    model's dtype, or attention fails on mixed dtypes (found on an H200: prefix tuning raised at the first chat)."""
    runtime = BaseRuntime(load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16"), tiny_tokenizer,
                          cache_size=2, max_rank=64)
    try:
        ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        adapter = runtime.adapters.load(AdapterRef(key=method, folder=trained[method], base_model="tiny"))
        ours = runtime.logits(ids, adapter)
        assert ours.dtype == torch.bfloat16 and bool(torch.isfinite(ours).all())
        assert (ours.float() - runtime.logits(ids, None).float()).abs().max() > 1e-2
    finally:
        runtime.close()
